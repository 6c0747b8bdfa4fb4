"""Per-adapter bookkeeping shared by every comol module that holds adapter tensors.

peft's :class:`~peft.tuners.tuners_utils.BaseTunerLayer` switches, freezes and deletes adapters by walking
the containers listed in ``adapter_layer_names`` (an ``nn.ModuleDict`` / ``nn.ParameterDict`` per part, keyed
by adapter name) and the dicts in ``other_param_names``. :class:`AdapterContainers` creates those containers
from a method's ``prefix`` and part names and sets up the attributes peft expects, once for both kinds of
comol modules: :class:`~comol.mixture.layer.MixtureLayer` (wraps a linear layer) and modules that wrap none,
such as SparseMoA's per-block router.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from comol.mixture.observe import RoutingContext, RoutingObserver

if TYPE_CHECKING:
    from comol.mixture.config import MixtureConfig


class AdapterContainers(BaseTunerLayer, RoutingObserver):
    """Mixin (with ``nn.Module``) for modules holding per-adapter tensors in peft's containers.

    Subclasses set :attr:`prefix` (``"<method>_"``), :attr:`module_parts` (one ``nn.ModuleDict`` each) and
    :attr:`param_parts` (one ``nn.ParameterDict`` each); the containers are named ``<prefix><part>`` and
    listed in peft's ``adapter_layer_names``. Call :meth:`init_adapter_containers` in ``__init__`` after
    ``nn.Module.__init__``; adapters are then switched with peft's ``set_adapter``, frozen with
    ``enable_adapters`` and removed with ``delete_adapter``.
    """

    prefix: ClassVar[str] = ""
    module_parts: ClassVar[tuple[str, ...]] = ()
    param_parts: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.adapter_layer_names = tuple(cls.prefix + part for part in cls.module_parts + cls.param_parts)

    def init_adapter_containers(self, module_key: str | None, context: RoutingContext | None) -> None:
        """Create the empty containers and peft's per-module bookkeeping (no adapter, none merged, enabled).

        Args:
            module_key: the module's name in the model, for error messages (None: set later).
            context: the owning tuner's :class:`~comol.mixture.observe.RoutingContext`.
        """
        for part in self.module_parts:
            setattr(self, self.prefix + part, nn.ModuleDict())
        for part in self.param_parts:
            setattr(self, self.prefix + part, nn.ParameterDict())
        self.adapter_config: dict[str, MixtureConfig] = {}
        self.module_key = module_key
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True  # peft's disable_input_dtype_casting switches it per module
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self.init_observer(context)

    def part(self, name: str) -> nn.ModuleDict | nn.ParameterDict:
        """The per-adapter container ``<prefix><name>``."""
        return getattr(self, self.prefix + name)
