"""Our own API keys (seed 002): their format, their keyed hash, the store (tables, migrations, operations). Imports the ground."""
