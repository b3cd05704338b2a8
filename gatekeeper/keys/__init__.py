"""Keys: the encrypted key store, the built-in CA, and certificate discovery."""
