"""diffusers integration: capture processors over one shared capture path, one adapter per family."""
