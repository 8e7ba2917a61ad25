"""Weight converters, one module per source family; the public entry points are in zoo.convert."""
