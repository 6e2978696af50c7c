"""rcdeploy: robust, compressed, integer image classifiers, verified on the runtime that ships them."""

__version__ = "0.1.0"
