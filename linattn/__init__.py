"""linattn: a JAX simulator of in-context learning and fine-tuning in linear attention.

See ../README.md for the layout; SPEC sections are cited in each module's docstring.
"""

__version__ = "0.1.0"
