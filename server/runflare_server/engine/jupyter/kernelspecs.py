"""Kernelspecs the engine builds itself, given to jupyter_client through its public extension point."""

from __future__ import annotations

from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel


class StaticKernelSpecManager(KernelSpecManager):
    """A ``KernelSpecManager`` that knows exactly the specs it is given (it searches no Jupyter path).

    Pass it to a ``KernelManager`` as ``kernel_spec_manager`` with ``kernel_name`` one of its names: the
    manager then starts that spec, and nothing installed on the host can stand in for it."""

    def __init__(self, specs: dict[str, KernelSpec], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.specs = dict(specs)

    def find_kernel_specs(self) -> dict[str, str]:
        """Names of the given specs → their resource dirs."""
        return {name: spec.resource_dir for name, spec in self.specs.items()}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        """The given spec of that name; raises ``NoSuchKernel`` for any other."""
        try:
            return self.specs[kernel_name]
        except KeyError:
            raise NoSuchKernel(kernel_name) from None

    def get_all_specs(self) -> dict[str, Any]:
        """The given specs, in ``KernelSpecManager.get_all_specs``'s shape."""
        return {name: {"resource_dir": spec.resource_dir, "spec": spec.to_dict()} for name, spec in self.specs.items()}

    def remove_kernel_spec(self, name: str) -> str:
        raise NoSuchKernel(name)  # nothing here is installed
