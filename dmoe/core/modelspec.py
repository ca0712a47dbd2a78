"""The model a swarm trains, published in the DHT: :class:`ModelSpec` (which experts, built how,
trained how), its TOML form, the schema fingerprint nodes put in their expert records, the check of
a node's explicit options against a spec, and storing, reading and re-storing specs.

A spec sits under the key ``_dmoe.models``, subkey ``<name>@ed25519:<owner>``: an owned record like
the nodes' (:mod:`dmoe.core.owner`), signed by whoever published it (``dmoe train`` for its model,
``dmoe coordinator start --model spec.toml``), so that no other peer can overwrite, tombstone or
outlast it; it expires like every record (at most ``MAX_RECORD_TTL``), and its publisher re-stores
it (:class:`SpecPublisher`). A name published by two owners is listed by readers as
``<name>@<first 8 characters of each owner>`` (as node ids are), so neither hides the other: a node
follows the name if they all say the same (several trainers of one model), and must otherwise name
the one it follows.

What a reader accepts (the style of :mod:`dmoe.core.recordrules`: a spec that breaks a rule is
skipped, the reason logged): a name of 1-64 letters, digits, ``_ - .``; 1-64 grids, each a uid
prefix and 1-4 dimensions of 1..4096, no prefix twice, at most ``MAX_SPEC_EXPERTS`` experts in all
(a node given the spec builds every uid of it); a built-in expert class (``ffn``, ``transformer``:
never ``module:Class``, which would make every node that follows the spec import a module a peer
named); sizes within ``MAX_DIM``; dtype ``float32`` (what nodes run); optimizer ``adam`` or ``sgd``
with a finite positive learning rate up to 10; finite bounded numbers elsewhere.

TOML form (``dmoe coordinator start --model spec.toml``)::

    name = "lm"                 # required
    experts = ["lm0.[0:8]", "lm1.[0:8]"]   # required: grids, as --experts writes them
    expert_cls = "ffn"          # ffn (default) or transformer
    hidden_dim = 128            # required
    inner_dim = 256             # default 4 x hidden_dim
    dtype = "float32"
    optimizer = "adam"          # adam (default) or sgd
    lr = 0.001
    max_grad_norm = 1.0
    seed = 0
    version = 1                 # raise it when the spec changes

Imports neither torch nor hivemind (the DHT functions import :mod:`dmoe.core.records` when called).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import tomllib
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from dmoe.core.owner import MAX_RECORD_TTL
from dmoe.core.recordrules import MAX_COUNT
from dmoe.core.uids import expand_patterns

if TYPE_CHECKING:
    from hivemind.dht import DHTNode

    from dmoe.core.dht import DHTPeer

logger = logging.getLogger(__name__)

MODELS_KEY = "_dmoe.models"
SPEC_VERSION = 1  # the record format of specs
MAX_SPEC_EXPERTS = 1 << 16  # experts of one spec, in all its grids
MAX_GRID_SIZE = 4096  # along one dimension of a grid
MAX_GRID_DIMS = 4
MAX_GRIDS = 64
MAX_DIM = 1 << 16  # hidden_dim; inner_dim up to 16 x this
MAX_LR = 10.0
MAX_GRAD_NORM = 1e6
SPEC_EXPERT_CLASSES = ("ffn", "transformer")
SPEC_DTYPES = ("float32",)
SPEC_OPTIMIZERS = ("adam", "sgd")
# the NodeConfig fields a spec sets (and that an explicit option must agree with)
NODE_FIELDS = ("expert_cls", "hidden_dim", "inner_dim", "optimizer", "lr", "max_grad_norm", "seed")
SPEC_TTL = 300.0  # seconds a published spec lives without a re-store
SPEC_REFRESH = 60.0  # seconds between re-stores

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")


def expert_schema(expert_cls: str, hidden_dim: int, inner_dim: int | None, dtype: str = "float32") -> str:
    """What a caller must agree on with an expert (its inputs' and parameters' shapes): the class,
    sizes and dtype, as announced in :attr:`~dmoe.core.records.ExpertRecord.expert_schema`, e.g.
    ``ffn/h128/i256/float32``. ``inner_dim`` None: the built-in classes' default, 4 x hidden_dim."""
    inner = 4 * hidden_dim if inner_dim is None else inner_dim
    return f"{expert_cls}/h{hidden_dim}/i{inner}/{dtype}"


class ExpertGrid(pydantic.BaseModel):
    """One grid of experts: uids ``<prefix>.i[.j...]`` with 0 <= i < grid[0], ..."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)
    prefix: str
    grid: list[int]

    @pydantic.field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX_RE.fullmatch(value):
            raise ValueError("not a uid prefix (a letter or _, then letters, digits, _ or -; at most 64)")
        return value

    @pydantic.field_validator("grid")
    @classmethod
    def _grid(cls, value: list[int]) -> list[int]:
        if not 1 <= len(value) <= MAX_GRID_DIMS or not all(1 <= size <= MAX_GRID_SIZE for size in value):
            raise ValueError(f"a grid has 1..{MAX_GRID_DIMS} dimensions of 1..{MAX_GRID_SIZE}")
        return value

    @property
    def size(self) -> int:
        return math.prod(self.grid)

    @property
    def pattern(self) -> str:
        """The grid as ``--experts`` writes it: ``lm0.[0:8]``."""
        return ".".join([self.prefix, *(f"[0:{size}]" for size in self.grid)])

    @classmethod
    def from_pattern(cls, pattern: str) -> ExpertGrid:
        """``lm0.[0:8]`` -> ExpertGrid(prefix='lm0', grid=[8]); ValueError for what is not a full grid."""
        prefix, *parts = pattern.strip().split(".")
        sizes = []
        for part in parts:
            match = re.fullmatch(r"\[0:(\d+)\]", part)
            if match is None:
                raise ValueError(f"{pattern!r}: a spec's grids are written prefix.[0:N][.[0:M]...]")
            sizes.append(int(match.group(1)))
        return cls(prefix=prefix, grid=sizes)


class ModelSpec(pydantic.BaseModel):
    """A model published in the swarm (see the module docstring); readers validate it on read."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    name: str
    experts: list[ExpertGrid]
    expert_cls: Literal["ffn", "transformer"] = "ffn"
    hidden_dim: int
    inner_dim: int
    dtype: Literal["float32"] = "float32"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    seed: int = 0
    version: int = 0  # raised by the publisher when the spec changes
    updated_at: float = 0.0  # the publisher's clock at its last store
    owner: str = ""  # owner id of the publisher (the owner its subkey names)
    record_version: int = SPEC_VERSION

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("a model name is 1-64 letters, digits, _, - or .")
        return value

    @pydantic.model_validator(mode="after")
    def _bounds(self) -> ModelSpec:
        if not 1 <= len(self.experts) <= MAX_GRIDS:
            raise ValueError(f"a spec has 1..{MAX_GRIDS} grids")
        prefixes = [grid.prefix for grid in self.experts]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("a prefix names two grids")
        if sum(grid.size for grid in self.experts) > MAX_SPEC_EXPERTS:
            raise ValueError(f"more than {MAX_SPEC_EXPERTS} experts")
        if not 1 <= self.hidden_dim <= MAX_DIM or not 1 <= self.inner_dim <= 16 * MAX_DIM:
            raise ValueError(f"hidden_dim must be in 1..{MAX_DIM} and inner_dim in 1..{16 * MAX_DIM}")
        if not 0 < self.lr <= MAX_LR or not 0 <= self.max_grad_norm <= MAX_GRAD_NORM:
            raise ValueError(f"lr must be in (0, {MAX_LR:g}] and max_grad_norm in [0, {MAX_GRAD_NORM:g}]")
        for name in ("seed", "version", "record_version"):
            if not 0 <= getattr(self, name) <= MAX_COUNT:
                raise ValueError(f"{name} must be in 0..{MAX_COUNT}")
        if not 0 <= self.updated_at <= 1e11:
            raise ValueError("updated_at is not a time")
        return self

    def as_peers_may_say(self) -> ModelSpec:
        """What :mod:`dmoe.core.records`' readers ask of a record: every rule is checked on parsing."""
        return self

    # ---- what nodes do with it ------------------------------------------------------------------
    @property
    def patterns(self) -> list[str]:
        """The spec's grids as ``--experts`` patterns."""
        return [grid.pattern for grid in self.experts]

    @property
    def uids(self) -> list[str]:
        return expand_patterns(self.patterns)

    @property
    def expert_schema(self) -> str:
        """What nodes announce for its experts (:func:`expert_schema`)."""
        return expert_schema(self.expert_cls, self.hidden_dim, self.inner_dim, self.dtype)

    def node_fields(self) -> dict[str, Any]:
        """The NodeConfig fields this spec sets (:data:`NODE_FIELDS`)."""
        return {name: getattr(self, name) for name in NODE_FIELDS}

    def conflicts(self, config: Any, given: Collection[str]) -> list[str]:
        """Why a node config's options named in ``given`` (set explicitly) disagree with this spec: one
        line per option, naming both values; empty if they agree."""
        lines = []
        for name in NODE_FIELDS:
            if name not in given:
                continue
            ours, theirs = getattr(config, name), getattr(self, name)
            if name == "inner_dim" and ours is None:
                ours = 4 * config.hidden_dim
            if ours != theirs:
                option = "--" + name.replace("_", "-")
                lines.append(f"{option} {ours} disagrees with model {self.name!r}, whose {name} is {theirs}")
        return lines

    # ---- making one ------------------------------------------------------------------------------
    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str = "spec") -> ModelSpec:
        """A spec from plain values, ``experts`` given as ``--experts`` patterns (the TOML form);
        ValueError naming ``where`` and what is wrong."""
        values = dict(values)
        unknown = set(values) - {"name", "experts", "expert_cls", "hidden_dim", "inner_dim", "dtype",
                                 "optimizer", "lr", "max_grad_norm", "seed", "version"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        patterns = values.get("experts")
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{where}: experts must be a list of grids, e.g. ['lm0.[0:8]']")
        if isinstance(values.get("hidden_dim"), int) and values.get("inner_dim") is None:
            values["inner_dim"] = 4 * values["hidden_dim"]
        try:
            values["experts"] = [ExpertGrid.from_pattern(pattern) for pattern in patterns]
            return cls.model_validate(values)
        except pydantic.ValidationError as e:
            reasons = "; ".join(f"{'.'.join(map(str, error['loc'])) or 'spec'}: {error['msg']}"
                                for error in e.errors())
            raise ValueError(f"{where}: {reasons}") from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_toml(cls, path: str) -> ModelSpec:
        """The spec of a TOML file (format: the module docstring); ValueError naming the file."""
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: {e}") from None
        return cls.from_values(data, where=path)


def resolve(specs: Mapping[str, ModelSpec], name: str | None) -> ModelSpec:
    """The spec named ``name`` (None: the only one) among those read from the swarm; ValueError that
    lists them when there is none, or several and no name."""
    listed = ", ".join(sorted(specs)) or "none"
    if name is None:
        if len(specs) == 1:
            return next(iter(specs.values()))
        if not specs:
            raise ValueError("the swarm publishes no model (dmoe train or dmoe coordinator start --model "
                             "publish one): give --experts and the sizes")
        raise ValueError(f"the swarm publishes several models ({listed}): choose one with --model NAME")
    if name in specs:
        return specs[name]
    claims = sorted(key for key in specs if key.startswith(f"{name}@"))
    if claims:  # several trainers of one model publish the same spec, each under its own key
        contents = [specs[key].model_dump(exclude={"owner", "updated_at"}) for key in claims]
        if all(content == contents[0] for content in contents):
            return specs[claims[0]]
        raise ValueError(f"model {name!r} is published by several owners, differently "
                         f"({', '.join(claims)}): give --model with the one to follow")
    raise ValueError(f"the swarm publishes no model {name!r} (published: {listed})")


# ---- the DHT ------------------------------------------------------------------------------------
async def store_spec_async(node: DHTNode, spec: ModelSpec, expiration_time: float) -> bool:
    """Store ``spec`` under ``_dmoe.models``, owned (and signed) by ``node``'s owner key."""
    from dmoe.core.owner import owned_subkey
    from dmoe.core.recordguard import owner_of

    owner = owner_of(node).owner_id
    if spec.owner not in ("", owner):
        raise ValueError(f"a spec of owner {spec.owner} cannot be published by {owner}")
    value = spec.model_copy(update={"owner": owner, "updated_at": time.time()}).model_dump()
    return bool(await node.store(MODELS_KEY, value, expiration_time, subkey=owned_subkey(spec.name, owner)))


def store_spec(peer: DHTPeer, spec: ModelSpec, ttl: float = SPEC_TTL, timeout: float | None = 30.0) -> bool:
    """:func:`store_spec_async` on a started DHT peer, expiring ``ttl`` seconds from now (blocking)."""
    from hivemind.utils import get_dht_time

    assert peer.node is not None, "start the DHT peer first"
    ttl = min(ttl, MAX_RECORD_TTL)
    return peer.run(store_spec_async(peer.node, spec, get_dht_time() + ttl), timeout)


async def find_specs_async(node: DHTNode) -> dict[str, ModelSpec]:
    """Every well-formed spec published in the swarm, by name (``<name>@<owner prefix>`` for a name
    several owners publish)."""
    from dmoe.core.records import _records_by_name

    return await _records_by_name(node, MODELS_KEY, ModelSpec, "name", lambda spec: True)


def find_specs(peer: DHTPeer, timeout: float | None = 30.0) -> dict[str, ModelSpec]:
    """:func:`find_specs_async` on a started DHT peer (blocking)."""
    assert peer.node is not None, "start the DHT peer first"
    return peer.run(find_specs_async(peer.node), timeout)


class SpecPublisher:
    """Stores a spec now and again every ``interval`` seconds (records expire), on a thread of its
    own, until :meth:`stop`. ``with SpecPublisher(peer, spec):``."""

    def __init__(self, peer: DHTPeer, spec: ModelSpec, *, ttl: float = SPEC_TTL,
                 interval: float = SPEC_REFRESH):
        if not 0 < interval < ttl <= MAX_RECORD_TTL:
            raise ValueError(f"need 0 < interval < ttl <= {MAX_RECORD_TTL:.0f}s")
        self.peer, self.spec, self.ttl, self.interval = peer, spec, ttl, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SpecPublisher:
        """Store the spec once (raises if no DHT peer takes it), then keep re-storing it."""
        if not store_spec(self.peer, self.spec, self.ttl):
            raise RuntimeError(f"no DHT peer stored the spec of model {self.spec.name!r}")
        logger.info("published model %r (%d experts, %s) in the swarm", self.spec.name,
                    len(self.spec.uids), self.spec.expert_schema)
        self._thread = threading.Thread(target=self._loop, name="dmoe-spec", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not store_spec(self.peer, self.spec, self.ttl):
                    logger.warning("no DHT peer took the spec of model %r this time", self.spec.name)
            except Exception as e:  # a DHT hiccup: try again at the next interval
                logger.warning("re-storing the spec of model %r failed: %r", self.spec.name, e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=35.0)
            self._thread = None

    def __enter__(self) -> SpecPublisher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
