"""The cluster admin's policy: what a pipeline may run and mount. Pure: data in, data out.

The admin writes the policy once in the chart's values (`policy:`); the chart renders it
twice from the same values: into the CEL of a ValidatingAdmissionPolicy (so `kubectl
apply` refuses a violating spec) and into a ConfigMap the operator reads at start-up
(`python -m llmpipe_operator --policy FILE`). `check` is the operator's second line: a spec
that slipped past admission (created before the policy existed, or with it disabled) is
refused here, before anything is rendered, with the same rule names as the admission
messages. `resolve` then fills the runtime from the chosen profile.

The rules (docs/security.md):
- runtimeProfile: `spec.runtime.profile` names one of the admin's profiles (unset: the
  default profile);
- allowedImages: `spec.runtime.image`, when set, is a profile's image or matches one of the
  admin's patterns (`*` matches any run of characters except `/`);
- allowedDevices: resources beyond cpu, memory, ephemeral-storage and hugepages-* (GPUs and
  other extended resources) only when the chosen profile lists them;
- literalEnv: `spec.runtime.env` holds literal values only (no valueFrom of any kind), and
  no variable that changes which code the stage loads (LD_*, PYTHONPATH, ...);
- hostPathPrefixes: a hostPath model source (a directory, or a GGUF file; the model's and
  the draft model's) lies under one of the admin's prefixes, without `.` or `..` segments
  (it is mounted read-only).
Secrets reach a stage only through the fields made for them (the Hub `tokenSecret` of a
huggingFace or gguf source, `spec.service.auth.apiKeySecret`), Secrets of the pipeline's own
namespace (a secretKeyRef or a secret volume cannot name another namespace); PVC sources are
claims of the pipeline's namespace. Neither needs a rule here.

Must not: read files, talk to the API server, import kopf or a client (import-linter).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmpipe_operator import spec as spec_mod

PROJECT_STAGE_IMAGE = "ghcr.io/llmpipe/llmpipe-stage:0.1.0"
"""The stage image this project builds (Dockerfile `--target stage`); the default profile."""
DEFAULT_IMAGE_PATTERNS = ("ghcr.io/llmpipe/llmpipe-stage:*", "ghcr.io/llmpipe/llmpipe-stage@*")
DEFAULT_HOST_PATH_PREFIXES = ("/var/lib/llmpipe/models",)
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
STANDARD_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage"})
"""Resources every profile may request; anything else (nvidia.com/gpu, ...) is a device."""
CODE_LOADING_ENV = frozenset(
    {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONINSPECT"}
)
"""With LD_*: variables that would make the trusted image run code from elsewhere (e.g. a
model directory the author controls)."""

RULE_PROFILE = "runtimeProfile"
RULE_IMAGES = "allowedImages"
RULE_DEVICES = "allowedDevices"
RULE_ENV = "literalEnv"
RULE_HOST_PATH = "hostPathPrefixes"


class PolicyError(ValueError):
    """The policy file itself is unusable (the operator refuses to start with it)."""


@dataclass(frozen=True)
class Violation:
    rule: str
    """One of the RULE_* names, also used in the admission messages."""
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}"


class PolicyViolation(Exception):
    """The spec breaks the admin's policy; nothing may be deployed for it."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(str(v) for v in self.violations))


@dataclass(frozen=True)
class RuntimeProfile:
    name: str
    image: str
    image_pull_policy: str = "IfNotPresent"
    """Images imported with `k3s ctr images import` need no registry."""
    resources: Mapping[str, Any] = field(default_factory=dict)
    """Default requests/limits; a spec's own values win key by key."""
    allowed_devices: frozenset[str] = frozenset()
    """Extended resources (e.g. nvidia.com/gpu) a spec with this profile may request."""
    runtime_class_name: str | None = None
    """The RuntimeClass of GPU stages when the spec names none (`nvidia` on K3s with the
    NVIDIA container toolkit); None: the node's default runtime."""


@dataclass(frozen=True)
class Policy:
    profiles: Mapping[str, RuntimeProfile]
    default_profile: str
    """The profile of a spec that names none."""
    allowed_images: tuple[str, ...] = DEFAULT_IMAGE_PATTERNS
    """Only the project's own stage image unless the admin says otherwise."""
    allowed_host_paths: tuple[str, ...] = DEFAULT_HOST_PATH_PREFIXES
    """Host directories are the admin's: only the models directory by default."""


def default_policy() -> Policy:
    """A fresh install's policy (the chart's default values say the same)."""
    profile = RuntimeProfile(name="default", image=PROJECT_STAGE_IMAGE)
    return Policy(profiles={"default": profile}, default_profile="default")


def parse_policy(raw: Mapping[str, Any]) -> Policy:
    """The policy from its JSON form (the chart's `policy` values); PolicyError naming the key."""
    if not isinstance(raw, Mapping):
        raise PolicyError("the policy must be an object")
    profiles_raw = raw.get("runtimeProfiles")
    if not isinstance(profiles_raw, Mapping) or not profiles_raw:
        raise PolicyError("policy.runtimeProfiles must name at least one profile")
    profiles = {str(n): _parse_profile(str(n), body) for n, body in profiles_raw.items()}
    default = raw.get("defaultProfile", "default")
    if default not in profiles:
        raise PolicyError(
            f"policy.defaultProfile {default!r} is not one of runtimeProfiles "
            f"({', '.join(sorted(profiles))})"
        )
    return Policy(
        profiles=profiles,
        default_profile=str(default),
        allowed_images=tuple(_strings(raw, "allowedImages")),
        allowed_host_paths=tuple(_host_prefix(p) for p in _strings(raw, "allowedHostPaths")),
    )


def _parse_profile(name: str, raw: Any) -> RuntimeProfile:
    where = f"policy.runtimeProfiles.{name}"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("image"), str) or not raw["image"]:
        raise PolicyError(f"{where}.image is required")
    pull = raw.get("imagePullPolicy") or "IfNotPresent"
    if pull not in PULL_POLICIES:
        raise PolicyError(f"{where}.imagePullPolicy must be one of {', '.join(PULL_POLICIES)}")
    resources = raw.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise PolicyError(f"{where}.resources must be an object")
    return RuntimeProfile(
        name=name,
        image=raw["image"],
        image_pull_policy=pull,
        resources=dict(resources),
        allowed_devices=frozenset(_strings(raw, "allowedDevices", where=where)),
        runtime_class_name=_runtime_class(raw, where),
    )


def _runtime_class(raw: Mapping[str, Any], where: str) -> str | None:
    value = raw.get("runtimeClassName")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not spec_mod.RUNTIME_CLASS.match(value):
        raise PolicyError(f"{where}.runtimeClassName must be a DNS subdomain name")
    return value


def _strings(raw: Mapping[str, Any], key: str, *, where: str = "policy") -> list[str]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}.{key} must be a list of non-empty strings")
    return list(value)


def _host_prefix(prefix: str) -> str:
    """'/var/lib/x/' -> '/var/lib/x'; '/' -> '' (every path is under it)."""
    if not prefix.startswith("/") or {".", ".."} & set(prefix.split("/")):
        raise PolicyError(f"policy.allowedHostPaths: {prefix!r} must be absolute, without . or ..")
    return prefix.rstrip("/")


# --- the check -------------------------------------------------------------------------------


def image_pattern_regex(pattern: str) -> str:
    """The regex an image must match as a whole: `*` is any run of characters except `/`,
    every other character is literal. The chart builds the same regex (anchored with ^ and
    $) for the admission CEL (helm/llmpipe/templates/_policy.tpl)."""
    return "[^/]*".join(re.escape(part) for part in pattern.split("*"))


def check(spec: spec_mod.PipelineSpec, policy: Policy) -> list[Violation]:
    """Every rule the spec breaks (empty: allowed)."""
    found: list[Violation] = []
    profile = _profile(spec, policy, found)
    found += _check_image(spec, policy)
    if profile is not None:
        found += _check_devices(spec, profile)
    found += _check_env(spec)
    found += _check_host_path(spec, policy)
    return found


def resolve(spec: spec_mod.PipelineSpec, policy: Policy) -> spec_mod.PipelineSpec:
    """The spec with its runtime completed from the profile; raises PolicyViolation.

    The image, pull policy and GPU stages' RuntimeClass come from the spec when it sets
    them, else from the profile; the profile's resources are defaults the spec overrides
    key by key."""
    violations = check(spec, policy)
    if violations:
        raise PolicyViolation(violations)
    runtime = spec.runtime
    profile = policy.profiles[runtime.profile or policy.default_profile]
    resources: dict[str, Any] = {}
    for part in ("requests", "limits"):
        merged = {**(profile.resources.get(part) or {}), **(runtime.resources.get(part) or {})}
        if merged:
            resources[part] = merged
    resolved = dataclasses.replace(
        runtime,
        profile=profile.name,
        image=runtime.image or profile.image,
        image_pull_policy=runtime.image_pull_policy or profile.image_pull_policy,
        resources=resources,
        runtime_class_name=runtime.runtime_class_name or profile.runtime_class_name,
    )
    return dataclasses.replace(spec, runtime=resolved)


def _profile(
    spec: spec_mod.PipelineSpec, policy: Policy, found: list[Violation]
) -> RuntimeProfile | None:
    name = spec.runtime.profile or policy.default_profile
    profile = policy.profiles.get(name)
    if profile is None:
        found.append(
            Violation(
                RULE_PROFILE,
                f"spec.runtime.profile {name!r} is not a runtime profile of this cluster "
                f"(profiles: {', '.join(sorted(policy.profiles))})",
            )
        )
    return profile


def _check_image(spec: spec_mod.PipelineSpec, policy: Policy) -> list[Violation]:
    image = spec.runtime.image
    if image is None or image in {p.image for p in policy.profiles.values()}:
        return []
    if any(re.fullmatch(image_pattern_regex(p), image) for p in policy.allowed_images):
        return []
    allowed = ", ".join(policy.allowed_images) or "none"
    return [
        Violation(
            RULE_IMAGES,
            f"spec.runtime.image {image!r} matches no allowed image pattern ({allowed}); "
            f"pick a runtime profile ({', '.join(sorted(policy.profiles))}) instead",
        )
    ]


def _check_devices(spec: spec_mod.PipelineSpec, profile: RuntimeProfile) -> list[Violation]:
    found = []
    for part in ("requests", "limits"):
        for resource in sorted((spec.runtime.resources.get(part) or {}).keys()):
            if _standard(resource) or resource in profile.allowed_devices:
                continue
            allowed = ", ".join(sorted(profile.allowed_devices)) or "none"
            found.append(
                Violation(
                    RULE_DEVICES,
                    f"spec.runtime.resources.{part}: {resource!r} is not a device runtime "
                    f"profile {profile.name!r} allows (allowed: {allowed})",
                )
            )
    return found


def _standard(resource: str) -> bool:
    return resource in STANDARD_RESOURCES or resource.startswith("hugepages-")


def _check_env(spec: spec_mod.PipelineSpec) -> list[Violation]:
    found = []
    for i, item in enumerate(spec.runtime.env):
        name = str(item.get("name"))
        if "valueFrom" in item:
            found.append(
                Violation(
                    RULE_ENV,
                    f"spec.runtime.env[{i}] ({name}): valueFrom is not allowed, only literal "
                    "values (a Hub token goes in spec.model.source.huggingFace.tokenSecret)",
                )
            )
        if name.startswith("LD_") or name in CODE_LOADING_ENV:
            found.append(
                Violation(
                    RULE_ENV,
                    f"spec.runtime.env[{i}]: {name} would change which code the stage runs",
                )
            )
    return found


def _check_host_path(spec: spec_mod.PipelineSpec, policy: Policy) -> list[Violation]:
    """The model's host path, and the draft model's (spec.model.draft) when it has one."""
    sources = [(spec.model.source, "spec.model.source")]
    if spec.model.draft is not None:
        sources.append((spec.model.draft.source, "spec.model.draft.source"))
    found = []
    for source, where in sources:
        if isinstance(source, spec_mod.HostPathSource):
            path, field_path = source.path, f"{where}.hostPath.path"
        elif isinstance(source, spec_mod.GgufSource) and source.host_path is not None:
            path, field_path = source.host_path, f"{where}.gguf.hostPath"
        else:
            continue
        if _under_prefix(path, policy.allowed_host_paths):
            continue
        allowed = ", ".join(p or "/" for p in policy.allowed_host_paths) or "none"
        found.append(
            Violation(
                RULE_HOST_PATH,
                f"{field_path} {path!r} is not under an allowed host directory ({allowed}), "
                "or contains . or .. segments",
            )
        )
    return found


def _under_prefix(path: str, prefixes: Sequence[str]) -> bool:
    if {".", ".."} & set(path.split("/")):
        return False
    return any(path == p or path.startswith(p + "/") for p in prefixes)
