"""The `yard` command, its typed client and the local stack launcher."""
