"""Parts that register themselves (model families, methods): every module of a package,
imported on first use, adds its part under a name."""

import importlib
import pkgutil


class Registry:
    def __init__(self, package: str):
        self.package = package
        self._parts: dict = {}
        self._loaded = False

    def add(self, part):
        """Register ``part`` under its ``name``; returns it."""
        self._parts[part.name] = part
        return part

    def parts(self) -> dict:
        """Every part by name, once each module of the package is imported."""
        if not self._loaded:  # a module imported on its own registers only itself
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
            self._loaded = True
        return self._parts
