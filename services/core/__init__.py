"""The shared chassis every ModelYard service is built on."""
