"""ModelYard services: the shared core and one package per gRPC service."""
