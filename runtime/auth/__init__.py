"""Who called and may they: peer identity, trusted proxies, API keys, cache, rate limits, the middleware. Imports serving, clients, observability, certificates and the shared ground."""
