"""The fuzz suite: `make test` runs it with the `suite` profile, `make fuzz` with `fuzz`."""
