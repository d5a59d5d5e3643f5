"""HTTP clients whose TLS follows the loader's security level. Imports only the shared ground."""
