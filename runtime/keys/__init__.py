"""Our own API keys (seed 002): their format, their keyed hash, the store's tables and migrations. Imports the ground."""
