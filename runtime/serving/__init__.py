"""Our TLS listeners: accept loop, bounded h11 protocol, the ASGI TLS extension, connection limits, HTTP headers. Imports certificates, observability and the shared ground."""
