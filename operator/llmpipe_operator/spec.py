"""The LLMPipeline spec as frozen dataclasses, and the one parser that builds them.

Pure: data in, data out. The schema in `crds/llmpipeline.yaml` is the source of truth; these
dataclasses mirror it field for field and the parser applies the same defaults (a unit test
compares them with the CRD's), so code that builds a spec by hand -- tests, the CLI -- gets
the values `kubectl apply` would have stored. The API server already refuses most bad specs
(OpenAPI + CEL); the parser re-checks what the operator relies on and raises `SpecError`
with the field's path, which the handlers turn into a `kopf.PermanentError`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from llmpipe_operator.planning import devices, inventory, live, profiles
from llmpipe_operator.planning import replan as replanning

Objective = Literal["throughput", "latency"]
StageRule = Literal["any", "edge"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]

DTYPES = ("auto", "bfloat16", "float16", "float32")
PLANNED_AUTO_DTYPE = "bfloat16"
"""The byte size the planner gives `auto`: every dtype it picks (bfloat16 or float16 on a
GPU, bfloat16 on a CPU) is 2 bytes per parameter."""
MODELS_MOUNT = "/models"
DRAFT_MOUNT = "/draft-model"
"""Where stage 0 finds the draft model (spec.model.draft), apart from the model's files."""
SPECULATIONS = ("auto", "off", "ngram", "draft")
RUNTIME_CLASS = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
"""Kubernetes label keys and values (the CRD's pattern for spec.placement.nodeSelector)."""


class SpecError(ValueError):
    """A spec the operator cannot act on; the message names the field and what to change."""


@dataclass(frozen=True)
class PvcSource:
    claim_name: str
    """PersistentVolumeClaim in the pipeline's namespace holding the model."""
    path: str = ""
    """Model directory relative to the volume root; "" is the root."""


@dataclass(frozen=True)
class HostPathSource:
    path: str
    """Absolute directory on every eligible node."""


@dataclass(frozen=True)
class HuggingFaceSource:
    id: str
    revision: str = "main"
    """A branch follows upstream; pin a commit for reproducible deployments."""
    token_secret_name: str | None = None
    """Secret with a Hub token, only for gated/private models (most public ones need none)."""
    token_secret_key: str = "token"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file that each stage's init container converts into a model directory.

    Exactly one location: `host_path` (the file on every eligible node), `claim_name` +
    `path` (the file inside a PersistentVolumeClaim), or `hf_id` + `filename` (a file of a
    Hugging Face repository, downloaded first)."""

    host_path: str | None = None
    claim_name: str | None = None
    path: str = ""
    """With claim_name: the file's path relative to the volume root."""
    hf_id: str | None = None
    revision: str = "main"
    filename: str = ""
    """With hf_id: the .gguf file in the repository (quantizations are separate files)."""
    token_secret_name: str | None = None
    token_secret_key: str = "token"

    @property
    def location(self) -> str:
        if self.host_path is not None:
            return "hostPath"
        return "pvc" if self.claim_name is not None else "huggingFace"


ModelSource = PvcSource | HostPathSource | HuggingFaceSource | GgufSource
SOURCE_KINDS = ("pvc", "hostPath", "huggingFace", "gguf")


def source_dir(source: ModelSource, mount: str) -> str:
    """Where a container finds config.json and the weights of `source` mounted at `mount`."""
    if isinstance(source, PvcSource) and source.path:
        return posixpath.join(mount, source.path)
    if isinstance(source, HuggingFaceSource | GgufSource):
        return posixpath.join(mount, "model")
    return mount


@dataclass(frozen=True)
class DraftSpec:
    """spec.model.draft: the small model stage 0 drafts with (`speculation: draft`), read
    from the same kinds of source as the model, run whole in stage 0's process at stage
    0's dtype (unquantized: the stage loads it so)."""

    source: ModelSource
    config: Mapping[str, Any]
    """Its config.json: the planner sizes its weights and KV cache from it."""

    @property
    def model_dir(self) -> str:
        """Where stage 0's container finds the draft model."""
        return source_dir(self.source, DRAFT_MOUNT)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: ModelSource
    config: Mapping[str, Any]
    dtype: str = "auto"
    """auto: each stage's device picks (bfloat16 where a GPU or CPU runs it natively,
    float16 on GPUs without it, e.g. a T4); a dtype named here applies to every stage."""
    quantization: str = "none"
    """int8: weight-only int8 projections (CPU stages); planned at their int8 byte size."""
    draft: DraftSpec | None = None
    """The draft model of `speculation: draft`; None without one."""

    @property
    def planned_dtype(self) -> str:
        """The dtype whose byte sizes the planner uses."""
        return PLANNED_AUTO_DTYPE if self.dtype == devices.DTYPE_AUTO else self.dtype

    @property
    def model_dir(self) -> str:
        """Where the stage container finds config.json and the weights."""
        return source_dir(self.source, MODELS_MOUNT)


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None

    def tolerates(self, taint: Mapping[str, Any]) -> bool:
        """Kubernetes' matching rule (v1/toleration.go ToleratesTaint)."""
        if self.effect and self.effect != taint.get("effect"):
            return False
        if self.key is None:
            return self.operator == "Exists"
        if self.key != taint.get("key"):
            return False
        if self.operator == "Exists":
            return True
        return (self.value or "") == (taint.get("value") or "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operator": self.operator}
        if self.key is not None:
            out["key"] = self.key
        if self.value is not None:
            out["value"] = self.value
        if self.effect is not None:
            out["effect"] = self.effect
        if self.toleration_seconds is not None:
            out["tolerationSeconds"] = self.toleration_seconds
        return out


@dataclass(frozen=True)
class PlacementSpec:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    first_stage: StageRule = "any"
    """"any" lets the planner put stage 0 wherever it is fastest; "edge" keeps prompts local."""
    last_stage: StageRule = "any"
    max_stages: int | None = None
    """None: as many stages as improve the objective."""
    exclude_nodes: frozenset[str] = frozenset()

    def eligibility(self) -> live.Eligibility:
        """Which Nodes may run a stage of this pipeline (selector, exclusions, taints)."""
        tolerations = self.tolerations
        return live.Eligibility(
            node_selector=self.node_selector,
            exclude_nodes=self.exclude_nodes,
            tolerates=lambda taint: any(t.tolerates(taint) for t in tolerations),
        )


@dataclass(frozen=True)
class WorkloadSpec:
    objective: Objective = "throughput"
    """Serving many users is the common case; latency suits one interactive user."""
    max_sequences: int = 4
    """A few sequences in flight keep every stage busy without a large KV reservation."""
    max_context_tokens: int = 2048
    """Enough for chat with small models; raise it knowing the KV cache grows with it."""
    prefill_chunk_tokens: int | None = None
    """Prompt tokens per pipelined prefill chunk (0: off); None: the plan's choice."""
    prefill_tokens_in_flight: int | None = None
    """Token throttling's bound on prompt tokens in flight (0: none); None: the stage's
    default, two chunks per stage."""
    speculation: str | None = None
    """`auto` (prompt-lookup drafts for greedy requests only), `ngram` (prompt-lookup
    drafts, greedy and sampled requests), `draft` (spec.model.draft's) or `off`; None:
    pipeline.json says nothing and the stage's default applies (`auto`; a stage older than
    `auto` reads it as off), so an unchanged spec keeps its plan hash."""


@dataclass(frozen=True)
class RuntimeSpec:
    profile: str | None = None
    """A runtime profile of the cluster's policy (llmpipe_operator.policy); None: the
    admin's default profile."""
    image: str | None = None
    """None: the profile's image. The policy completes it before anything is rendered."""
    image_pull_policy: str | None = None
    """None: the profile's pull policy."""
    resources: Mapping[str, Any] = field(default_factory=dict)
    env: tuple[Mapping[str, Any], ...] = ()
    runtime_overhead_bytes: int = 512 * 1024**2
    """Python + torch + buffers take about half a GiB beyond weights and KV cache."""
    device: devices.Device = "auto"
    """auto: a stage computes on its node's GPU when the node has one free (GPU Feature
    Discovery labels), else on the CPU; cpu never uses a GPU; cuda plans on GPU nodes only."""
    runtime_class_name: str | None = None
    """The RuntimeClass of GPU stages (K3s with the NVIDIA container toolkit: `nvidia`);
    None: the runtime profile's, else the cluster's default runtime."""


@dataclass(frozen=True)
class AuthSpec:
    api_key_secret: str | None = None
    """Secret (this namespace) of API keys; None serves the API without keys, as before."""
    protect_metrics: bool = False
    """Prometheus scrapes without credentials by default, and /metrics holds no text."""


@dataclass(frozen=True)
class ServiceSpec:
    port: int = 8000
    """The stage's own HTTP port, so port-forwarding and in-cluster URLs look the same."""
    type: ServiceType = "ClusterIP"
    """Private by default; expose on purpose."""
    auth: AuthSpec = AuthSpec()
    max_prompt_characters: int = 1_000_000
    """Refused before tokenizing; about 250k tokens of text, tokenized in well under 1 s."""
    allow_from: tuple[Mapping[str, Any], ...] = ()
    """NetworkPolicy peers that may reach the HTTP port; () = pods of the pipeline's own
    namespace, the narrowest useful default (manifests/network.py)."""


@dataclass(frozen=True)
class PipelineSpec:
    model: ModelSpec
    placement: PlacementSpec = PlacementSpec()
    workload: WorkloadSpec = WorkloadSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    service: ServiceSpec = ServiceSpec()
    replan: replanning.ReplanSettings = field(default_factory=replanning.ReplanSettings)

    def profile(self) -> profiles.ModelProfile:
        """The planner's view of the model (exact per-layer byte sizes from config.json)."""
        try:
            return profiles.from_config(
                self.model.config,
                dtype=self.model.planned_dtype,
                name=self.model.name,
                quantization=self.model.quantization,
            )
        except (ValueError, KeyError, TypeError) as error:
            raise SpecError(f"spec.model.config: {error}") from error

    def draft_profile(self) -> profiles.ModelProfile | None:
        """The planner's view of the draft model (None without one): its byte sizes at
        the dtype stage 0 loads it in, the model's planned one, unquantized."""
        draft = self.model.draft
        if draft is None:
            return None
        try:
            return profiles.from_config(
                draft.config, dtype=self.model.planned_dtype, name=f"{self.model.name} draft"
            )
        except (ValueError, KeyError, TypeError) as error:
            raise SpecError(f"spec.model.draft.config: {error}") from error


def parse_spec(raw: Mapping[str, Any]) -> PipelineSpec:
    """Build the typed spec from the resource's `spec`; raise SpecError naming the field."""
    if not isinstance(raw, Mapping):
        raise SpecError("spec must be an object")
    spec = PipelineSpec(
        model=_parse_model(_object(raw, "model", "spec", required=True)),
        placement=_parse_placement(_object(raw, "placement", "spec")),
        workload=_parse_workload(_object(raw, "workload", "spec")),
        runtime=_parse_runtime(_object(raw, "runtime", "spec")),
        service=_parse_service(_object(raw, "service", "spec")),
        replan=_parse_replan(_object(raw, "replan", "spec")),
    )
    spec.profile()  # an unusable config.json is a spec error, found before planning
    _check_draft(spec)
    return spec


def _check_draft(spec: PipelineSpec) -> None:
    """spec.model.draft and `speculation: draft` come together, and the draft model's
    vocabulary is the model's (stage 0 compares the tokenizers themselves at load)."""
    draft, speculation = spec.model.draft, spec.workload.speculation
    if draft is not None and speculation != "draft":
        raise SpecError(
            f"spec.model.draft is set but spec.workload.speculation is {speculation or 'unset'}"
            ": set spec.workload.speculation to draft, or remove spec.model.draft"
        )
    if draft is None and speculation == "draft":
        raise SpecError(
            "spec.workload.speculation is draft but spec.model.draft is not set: name the "
            "draft model (spec.model.draft.source and spec.model.draft.config)"
        )
    if draft is None:
        return
    spec.draft_profile()  # an unusable draft config.json, found before planning
    mine, theirs = spec.model.config.get("vocab_size"), draft.config.get("vocab_size")
    if mine != theirs:
        raise SpecError(
            f"spec.model.draft.config.vocab_size is {theirs} but spec.model.config.vocab_size "
            f"is {mine}: a draft model needs the model's tokenizer"
        )


def _parse_model(raw: Mapping[str, Any]) -> ModelSpec:
    where = "spec.model"
    config = _object(raw, "config", where, required=True)
    return ModelSpec(
        name=_string(raw, "name", where, required=True),
        source=_parse_source(_object(raw, "source", where, required=True), f"{where}.source"),
        config=dict(config),
        dtype=_choice(raw, "dtype", where, DTYPES, default="auto"),
        quantization=_choice(raw, "quantization", where, profiles.QUANTIZATIONS, default="none"),
        draft=_parse_draft(_object(raw, "draft", where)) if raw.get("draft") is not None else None,
    )


def _parse_draft(raw: Mapping[str, Any]) -> DraftSpec:
    where = "spec.model.draft"
    return DraftSpec(
        source=_parse_source(_object(raw, "source", where, required=True), f"{where}.source"),
        config=dict(_object(raw, "config", where, required=True)),
    )


def _parse_source(raw: Mapping[str, Any], where: str) -> ModelSource:
    kinds = [kind for kind in SOURCE_KINDS if raw.get(kind) is not None]
    if len(kinds) != 1:
        raise SpecError(
            f"{where} must set exactly one of pvc, hostPath, huggingFace or gguf "
            f"(got {kinds or 'none'})"
        )
    body = _object(raw, kinds[0], where, required=True)
    if kinds[0] == "gguf":
        return _parse_gguf(body, f"{where}.gguf")
    if kinds[0] == "pvc":
        path = _string(body, "path", f"{where}.pvc", default="") or ""
        if path.startswith("/") or ".." in path.split("/"):
            raise SpecError(f"{where}.pvc.path must be relative and without '..' (got {path!r})")
        return PvcSource(
            claim_name=_string(body, "claimName", f"{where}.pvc", required=True),
            path=path.strip("/"),
        )
    if kinds[0] == "hostPath":
        path = _string(body, "path", f"{where}.hostPath", required=True)
        if not path.startswith("/"):
            raise SpecError(f"{where}.hostPath.path must be absolute (got {path!r})")
        return HostPathSource(path=path)
    secret = _object(body, "tokenSecret", f"{where}.huggingFace")
    return HuggingFaceSource(
        id=_string(body, "id", f"{where}.huggingFace", required=True),
        revision=_string(body, "revision", f"{where}.huggingFace", default="main"),
        token_secret_name=(
            _string(secret, "name", f"{where}.huggingFace.tokenSecret", required=True)
            if secret
            else None
        ),
        token_secret_key=_string(
            secret, "key", f"{where}.huggingFace.tokenSecret", default="token"
        ),
    )


def _parse_gguf(raw: Mapping[str, Any], where: str) -> GgufSource:
    kinds = [kind for kind in ("hostPath", "pvc", "huggingFace") if raw.get(kind) is not None]
    if len(kinds) != 1:
        raise SpecError(
            f"{where} must set exactly one of hostPath, pvc or huggingFace (got {kinds or 'none'})"
        )
    if kinds[0] == "hostPath":
        path = _string(raw, "hostPath", where, required=True)
        if not path.startswith("/") or not path.endswith(".gguf"):
            raise SpecError(
                f"{where}.hostPath must be an absolute path to a .gguf file (got {path!r})"
            )
        return GgufSource(host_path=path)
    body = _object(raw, kinds[0], where, required=True)
    if kinds[0] == "pvc":
        path = _string(body, "path", f"{where}.pvc", required=True)
        if path.startswith("/") or ".." in path.split("/") or not path.endswith(".gguf"):
            raise SpecError(
                f"{where}.pvc.path must be a relative path to a .gguf file, without '..' "
                f"(got {path!r})"
            )
        return GgufSource(
            claim_name=_string(body, "claimName", f"{where}.pvc", required=True), path=path
        )
    hub = f"{where}.huggingFace"
    filename = _string(body, "filename", hub, required=True)
    if filename.startswith("/") or ".." in filename.split("/") or not filename.endswith(".gguf"):
        raise SpecError(f"{hub}.filename must be a .gguf file in the repository (got {filename!r})")
    secret = _object(body, "tokenSecret", hub)
    return GgufSource(
        hf_id=_string(body, "id", hub, required=True),
        revision=_string(body, "revision", hub, default="main"),
        filename=filename,
        token_secret_name=(
            _string(secret, "name", f"{hub}.tokenSecret", required=True) if secret else None
        ),
        token_secret_key=_string(secret, "key", f"{hub}.tokenSecret", default="token"),
    )


def _parse_placement(raw: Mapping[str, Any]) -> PlacementSpec:
    where = "spec.placement"
    selector = _object(raw, "nodeSelector", where)
    max_stages = raw.get("maxStages")
    if max_stages is not None and (not _is_int(max_stages) or max_stages < 1):
        raise SpecError(f"{where}.maxStages must be an integer >= 1 (got {max_stages!r})")
    for key, value in selector.items():
        if not LABEL_KEY.match(str(key)) or not LABEL_VALUE.match(str(value)):
            raise SpecError(
                f"{where}.nodeSelector: {_brief(key)}={_brief(value)} is not a Kubernetes "
                "label key and value (values: at most 63 of [A-Za-z0-9._-])"
            )
    return PlacementSpec(
        node_selector={str(k): str(v) for k, v in selector.items()},
        tolerations=tuple(
            _parse_toleration(item, f"{where}.tolerations[{i}]")
            for i, item in enumerate(_list(raw, "tolerations", where))
        ),
        first_stage=_choice(raw, "firstStage", where, ("any", "edge"), default="any"),  # type: ignore[arg-type]
        last_stage=_choice(raw, "lastStage", where, ("any", "edge"), default="any"),  # type: ignore[arg-type]
        max_stages=max_stages,
        exclude_nodes=frozenset(str(n) for n in _list(raw, "excludeNodes", where)),
    )


def _parse_toleration(raw: Any, where: str) -> Toleration:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where} must be an object")
    operator = _choice(raw, "operator", where, ("Exists", "Equal"), default="Equal")
    key = raw.get("key")
    if key is None and operator != "Exists":
        raise SpecError(f"{where}: a toleration without a key must use operator Exists")
    seconds = raw.get("tolerationSeconds")
    return Toleration(
        key=key,
        operator=operator,
        value=raw.get("value"),
        effect=raw.get("effect"),
        toleration_seconds=int(seconds) if seconds is not None else None,
    )


def _parse_workload(raw: Mapping[str, Any]) -> WorkloadSpec:
    where = "spec.workload"
    return WorkloadSpec(
        objective=_choice(
            raw,
            "objective",
            where,
            ("throughput", "latency"),  # type: ignore[arg-type]
            default="throughput",
        ),
        max_sequences=_positive_int(raw, "maxSequences", where, default=4),
        max_context_tokens=_positive_int(raw, "maxContextTokens", where, default=2048),
        prefill_chunk_tokens=_chunk_tokens(raw, where),
        prefill_tokens_in_flight=_tokens_in_flight(raw, where),
        speculation=(
            _choice(raw, "speculation", where, SPECULATIONS, default="off")
            if "speculation" in raw
            else None
        ),
    )


def _chunk_tokens(raw: Mapping[str, Any], where: str) -> int | None:
    value = raw.get("prefillChunkTokens")
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise SpecError(f"{where}.prefillChunkTokens must be an integer >= 0 (got {value!r})")
    return int(value)


def _tokens_in_flight(raw: Mapping[str, Any], where: str) -> int | None:
    value = raw.get("prefillTokensInFlight")
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise SpecError(f"{where}.prefillTokensInFlight must be an integer >= 0 (got {value!r})")
    return int(value)


def _parse_runtime(raw: Mapping[str, Any]) -> RuntimeSpec:
    where = "spec.runtime"
    overhead = raw.get("runtimeOverhead", "512Mi")
    try:
        overhead_bytes = inventory.parse_quantity(overhead)
    except ValueError as error:
        raise SpecError(f"{where}.runtimeOverhead: {error}") from error
    env = _list(raw, "env", where)
    for i, item in enumerate(env):
        if not isinstance(item, Mapping) or not item.get("name"):
            raise SpecError(f"{where}.env[{i}] must be an object with a name")
    pulls = ("Always", "IfNotPresent", "Never")
    pull = raw.get("imagePullPolicy")
    runtime_class = _string(raw, "runtimeClassName", where) or None
    if runtime_class is not None and not RUNTIME_CLASS.match(runtime_class):
        raise SpecError(
            f"{where}.runtimeClassName must be a DNS subdomain name (got {_brief(runtime_class)})"
        )
    return RuntimeSpec(
        profile=_string(raw, "profile", where) or None,
        image=_string(raw, "image", where) or None,
        image_pull_policy=(
            None if pull is None else _choice(raw, "imagePullPolicy", where, pulls, default="")
        ),
        resources=dict(_object(raw, "resources", where)),
        env=tuple(dict(item) for item in env),
        runtime_overhead_bytes=overhead_bytes,
        device=_choice(raw, "device", where, devices.DEVICES, default="auto"),  # type: ignore[arg-type]
        runtime_class_name=runtime_class,
    )


def _parse_service(raw: Mapping[str, Any]) -> ServiceSpec:
    where = "spec.service"
    port = _positive_int(raw, "port", where, default=8000)
    if port > 65535:
        raise SpecError(f"{where}.port must be at most 65535 (got {port})")
    auth = _object(raw, "auth", where)
    protect = auth.get("protectMetrics", False)
    if not isinstance(protect, bool):
        raise SpecError(f"{where}.auth.protectMetrics must be true or false (got {protect!r})")
    return ServiceSpec(
        auth=AuthSpec(
            api_key_secret=_string(auth, "apiKeySecret", f"{where}.auth") or None,
            protect_metrics=protect,
        ),
        max_prompt_characters=_positive_int(
            raw, "maxPromptCharacters", where, default=ServiceSpec.max_prompt_characters
        ),
        port=port,
        allow_from=_parse_peers(raw, where),
        type=_choice(
            raw,
            "type",
            where,
            ("ClusterIP", "NodePort", "LoadBalancer"),  # type: ignore[arg-type]
            default="ClusterIP",
        ),
    )


PEER_KINDS = ("podSelector", "namespaceSelector", "ipBlock")


def _parse_peers(raw: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], ...]:
    """`allowFrom` items are NetworkPolicy peers: podSelector/namespaceSelector/ipBlock."""
    peers = []
    for i, item in enumerate(_list(raw, "allowFrom", where)):
        at = f"{where}.allowFrom[{i}]"
        if not isinstance(item, Mapping) or not item or set(item) - set(PEER_KINDS):
            raise SpecError(f"{at} must set podSelector, namespaceSelector or ipBlock (only)")
        alone = set(item) == {"ipBlock"}
        if "ipBlock" in item and (not alone or not _object(item, "ipBlock", at).get("cidr")):
            raise SpecError(f"{at}.ipBlock needs a cidr and stands alone")
        peers.append(dict(item))
    return tuple(peers)


def _parse_replan(raw: Mapping[str, Any]) -> replanning.ReplanSettings:
    try:
        return replanning.ReplanSettings.from_spec(raw)
    except ValueError as error:
        raise SpecError(str(error)) from error


# --- field readers: each names the field's path in its error ---------------------------------


def _object(
    raw: Mapping[str, Any], key: str, where: str, *, required: bool = False
) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        if required:
            raise SpecError(f"{where}.{key} is required")
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}.{key} must be an object (got {type(value).__name__})")
    return value


def _list(raw: Mapping[str, Any], key: str, where: str) -> Sequence[Any]:
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise SpecError(f"{where}.{key} must be a list (got {type(value).__name__})")
    return value


def _string(
    raw: Mapping[str, Any], key: str, where: str, *, required: bool = False, default: str = ""
) -> str:
    value = raw.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(f"{where}.{key} is required")
        return default
    if not isinstance(value, str):
        raise SpecError(f"{where}.{key} must be a string (got {value!r})")
    return value


def _choice(
    raw: Mapping[str, Any], key: str, where: str, allowed: Sequence[str], *, default: str
) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        raise SpecError(f"{where}.{key} must be one of {', '.join(allowed)} (got {value!r})")
    return str(value)


def _positive_int(raw: Mapping[str, Any], key: str, where: str, *, default: int) -> int:
    value = raw.get(key, default)
    if not _is_int(value) or value < 1:
        raise SpecError(f"{where}.{key} must be an integer >= 1 (got {value!r})")
    return int(value)


def _brief(value: Any, limit: int = 64) -> str:
    """A value for an error message, cut so a 100 KiB string does not fill it."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
