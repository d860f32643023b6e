"""Research methods' plug-ins (see effjax/train/plugins.py), registered on import.

The order is the order initialisers chain in: a dense source run is first upcycled into
experts, then projected onto Monarch."""
from effjax.train.methods import low_rank  # noqa: F401
from effjax.train.methods import sst  # noqa: F401
from effjax.train.methods import relora  # noqa: F401
from effjax.train.methods import upcycling  # noqa: F401
from effjax.train.methods import monarch  # noqa: F401
