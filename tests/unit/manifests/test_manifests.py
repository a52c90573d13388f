"""Manifests: what one plan renders to (names by plan hash, pinning, wiring, security, owners).

Covers: stage Deployments pinned to their planned node with the pipeline's tolerations,
probes, ports and the restricted securityContext; the command of the stage contract; the
model source (PVC, hostPath, Hugging Face init container with the token Secret); the plan
ConfigMap's plan.json and pipeline.json; stage Services; the user-facing Service's
selector; owner references on everything; the plan hash's sensitivity.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import endpoint, model_files, names, render, stages
from tests.unit.manifests.builders import REF, a_plan, a_spec

sources = pytest.mark.parametrize(
    "builder, volume_key, model_dir",
    [
        (
            lambda: a_spec().pvc("models", "llama/tiny"),
            "persistentVolumeClaim",
            "/models/llama/tiny",
        ),
        (lambda: a_spec(), "hostPath", "/models"),
        (lambda: a_spec().hugging_face("org/tiny", secret="hf"), "emptyDir", "/models/model"),
    ],
    ids=["pvc", "hostPath", "huggingFace"],
)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def test_every_stage_gets_a_deployment_and_service_named_by_plan_hash() -> None:
    spec = a_spec().build()
    plan = a_plan(spec)
    digest = names.plan_hash(plan, spec)
    objects = render.render_plan(REF, spec, plan, digest=digest)
    count = len(plan["stages"])
    assert [o["kind"] for o in objects] == ["ConfigMap"] + ["Service"] * count + [
        "Deployment"
    ] * count
    for i, deployment in enumerate(by_kind(objects, "Deployment")):
        assert deployment["metadata"]["name"] == f"chat-{digest}-s{i}"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels[names.LABEL_PIPELINE] == "chat"
        assert labels[names.LABEL_PLAN_HASH] == digest
        assert labels[names.LABEL_STAGE_INDEX] == str(i)
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for o in objects:
        assert o["metadata"]["namespace"] == "team-a"
        assert o["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "llmpipe.io/v1alpha1",
                "kind": "LLMPipeline",
                "name": "chat",
                "uid": "0000-uid",
                "controller": True,
            }
        ]


def test_stage_is_pinned_to_its_planned_node_with_the_pipelines_tolerations() -> None:
    spec = (
        a_spec()
        .placement(tolerations=[{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}])
        .build()
    )
    plan = a_plan(spec)
    for stage in plan["stages"]:
        pod = stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")["spec"][
            "template"
        ]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        assert terms == [
            {
                "matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [stage["node"]]}
                ]
            }
        ]
        assert pod["tolerations"] == [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]


def test_stage_container_follows_the_stage_contract_and_is_restricted() -> None:
    spec = (
        a_spec()
        .runtime(
            image="registry.local/stage:1",
            env=[{"name": "LOG", "value": "debug"}],
            resources={"limits": {"memory": "2Gi"}},
        )
        .build()
    )
    stage = a_plan(spec)["stages"][1]
    deployment = stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container["image"] == "registry.local/stage:1"
    assert container["command"] == [
        "python",
        "-m",
        "llmpipe_stage",
        "--config-dir",
        "/etc/llmpipe",
        "--tls-dir",
        "/var/run/llmpipe/tls",
        "--stage-index",
        "1",
        "--drain-timeout",
        "50",
        "--model-dir",
        "/models",
    ]
    # SIGTERM drains the stage (--drain-timeout) before the kubelet's SIGKILL
    assert pod["terminationGracePeriodSeconds"] > 50
    assert {"name": "LLMPIPE_STAGE_INDEX", "value": "1"} in container["env"]
    assert {"name": "LOG", "value": "debug"} in container["env"]
    # the plan's reservation is requested; the user's larger limit stays
    assert container["resources"] == {
        "requests": {"memory": str(stage["memoryBytes"]), "cpu": "100m"},
        "limits": {"memory": "2Gi"},
    }
    assert {(p["name"], p["containerPort"]) for p in container["ports"]} == {
        ("grpc", 50051),
        ("http", 8000),
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert mounts["/etc/llmpipe"]["readOnly"] is True
    assert "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["plan"]["configMap"]["name"] == "chat-abcd1234-plan"
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    # The stage's own certificate only, read-only, readable by the stage's group (fsGroup);
    # a whole-directory mount (no subPath) so the kubelet refreshes renewed files.
    assert mounts["/var/run/llmpipe/tls"] == {
        "name": "tls",
        "mountPath": "/var/run/llmpipe/tls",
        "readOnly": True,
    }
    assert volumes["tls"]["secret"] == {
        "secretName": "chat-abcd1234-s1-tls",
        "defaultMode": 0o440,
    }
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 10001


@sources
def test_model_source_is_mounted_read_only_or_fetched(builder, volume_key, model_dir) -> None:
    spec = builder().build()
    stage = a_plan(spec)["stages"][0]
    pod = stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")["spec"]["template"][
        "spec"
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volume_key in volumes["model"]
    assert pod["containers"][0]["command"][-1] == model_dir
    if volume_key == "persistentVolumeClaim":
        assert volumes["model"]["persistentVolumeClaim"] == {
            "claimName": "models",
            "readOnly": True,
        }
    if volume_key == "emptyDir":
        (init,) = pod["initContainers"]
        assert init["command"][:6] == [
            "python",
            "-m",
            "llmpipe_stage.fetch",
            "org/tiny",
            "abc123",
            "/models/model",
        ]
        assert volumes["model"]["emptyDir"]["sizeLimit"] == str(
            model_files.download_size_limit(model_files.model_files(spec))
        )
        token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
        assert token["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
        # only the init container sees the token
        assert all(e["name"] != "HF_TOKEN" for e in pod["containers"][0]["env"])
    else:
        assert "initContainers" not in pod


def test_plan_configmap_carries_plan_json_and_every_stage_address() -> None:
    spec = a_spec().workload(maxSequences=6, maxContextTokens=512).build()
    plan = a_plan(spec)
    digest = names.plan_hash(plan, spec)
    objects = render.render_plan(REF, spec, plan, digest=digest)
    (configmap,) = by_kind(objects, "ConfigMap")
    assert configmap["metadata"]["name"] == f"chat-{digest}-plan"
    assert json.loads(configmap["data"]["plan.json"]) == plan
    pipeline = json.loads(configmap["data"]["pipeline.json"])
    assert pipeline["model"] == {"name": "tiny-llama", "dtype": "bfloat16"}
    # a plan without a chunk choice (from before chunked prefill): chunking off
    assert pipeline["workload"] == {
        "maxSequences": 6,
        "maxContextTokens": 512,
        "prefillChunkTokens": 0,
    }
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    for entry in pipeline["stages"]:
        host, port = entry["address"].rsplit(":", 1)
        name, namespace, svc = host.split(".")
        assert (namespace, svc, port) == ("team-a", "svc", "50051")
        service = services[name]
        assert service["spec"]["selector"][names.LABEL_STAGE_INDEX] == str(entry["index"])
        assert {
            "name": "grpc",
            "port": 50051,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        } in service["spec"]["ports"]


def test_prefill_chunk_is_the_plans_choice_unless_the_spec_sets_one() -> None:
    def chunk(spec: Any, plan: dict[str, Any]) -> int:
        digest = names.plan_hash(plan, spec)
        (configmap,) = by_kind(render.render_plan(REF, spec, plan, digest=digest), "ConfigMap")
        return int(json.loads(configmap["data"]["pipeline.json"])["workload"]["prefillChunkTokens"])

    planned = a_spec().build()
    plan = {**a_plan(planned), "prefillChunkTokens": 64}
    assert chunk(planned, plan) == 64
    off = a_spec().workload(prefillChunkTokens=0).build()
    assert chunk(off, {**a_plan(off), "prefillChunkTokens": 64}) == 0
    fixed = a_spec().workload(prefillChunkTokens=200).build()
    assert chunk(fixed, {**a_plan(fixed), "prefillChunkTokens": 64}) == 200
    # setting it is a change of the stage pods (their pipeline.json): a new plan hash
    assert names.plan_hash(plan, fixed) != names.plan_hash(plan, planned)


def test_speculation_reaches_pipeline_json_only_when_set() -> None:
    def workload(spec: Any) -> dict[str, Any]:
        plan = a_plan(spec)
        objects = render.render_plan(REF, spec, plan, digest=names.plan_hash(plan, spec))
        (configmap,) = by_kind(objects, "ConfigMap")
        return dict(json.loads(configmap["data"]["pipeline.json"])["workload"])

    assert "speculation" not in workload(a_spec().build())
    assert workload(a_spec().workload(speculation="ngram").build())["speculation"] == "ngram"
    assert workload(a_spec().workload(speculation="off").build())["speculation"] == "off"
    assert workload(a_spec().workload(speculation="auto").build())["speculation"] == "auto"
    assert workload(a_spec().draft().build())["speculation"] == "draft"
    with pytest.raises(spec_mod.SpecError, match=r"spec\.model\.draft is not set"):
        a_spec().workload(speculation="draft").build()


def test_prompt_tokens_in_flight_reach_pipeline_json_only_when_set() -> None:
    def workload(spec: Any) -> dict[str, Any]:
        plan = a_plan(spec)
        objects = render.render_plan(REF, spec, plan, digest=names.plan_hash(plan, spec))
        (configmap,) = by_kind(objects, "ConfigMap")
        return dict(json.loads(configmap["data"]["pipeline.json"])["workload"])

    default = a_spec().build()
    assert "prefillTokensInFlight" not in workload(default)  # the stage's default
    bounded = a_spec().workload(prefillTokensInFlight=256).build()
    assert workload(bounded)["prefillTokensInFlight"] == 256
    assert (
        workload(a_spec().workload(prefillTokensInFlight=0).build())["prefillTokensInFlight"] == 0
    )
    plan = a_plan(default)
    assert names.plan_hash(plan, bounded) != names.plan_hash(plan, default)
    for bad in (-1, "64", True):
        with pytest.raises(spec_mod.SpecError, match="prefillTokensInFlight must be an integer"):
            a_spec().workload(prefillTokensInFlight=bad).build()


def test_endpoint_service_selects_one_plans_stage_zero() -> None:
    spec = a_spec().service(port=80, type="NodePort").build()
    service = endpoint.build_endpoint_service(REF, spec, serving_digest="abcd1234")
    assert service["metadata"]["name"] == "chat"
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["selector"] == {
        names.LABEL_PIPELINE: "chat",
        names.LABEL_PLAN_HASH: "abcd1234",
        names.LABEL_STAGE_INDEX: "0",
    }
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert endpoint.serving_digest(service) == "abcd1234"
    assert endpoint.serving_digest(None) is None


def test_plan_hash_follows_what_the_stage_pods_are_built_from() -> None:
    spec = a_spec().build()
    plan = a_plan(spec)
    base = names.plan_hash(plan, spec)
    assert len(base) == 8
    assert names.plan_hash(plan, a_spec().build()) == base  # deterministic
    assert names.plan_hash(plan, a_spec().service(port=9000).build()) == base
    assert names.plan_hash(plan, a_spec().runtime(image="other:2").build()) != base
    keys = a_spec().service(auth={"apiKeySecret": "keys"}).build()
    assert names.plan_hash(plan, keys) != base  # stage 0 mounts the Secret
    other_plan = a_plan(spec, max_stages=1)
    assert names.plan_hash(other_plan, spec) != base


def test_stage_names_fit_a_dns_label_for_the_longest_allowed_pipeline_name() -> None:
    ref = names.PipelineRef(name="p" * 45, namespace="ns", uid="u")
    assert len(names.stage_name(ref, "abcd1234", 63)) <= 63
    assert len(names.plan_configmap_name(ref, "abcd1234")) <= 63


memory_policies = pytest.mark.parametrize(
    ("resources", "limit"),
    [
        ({}, None),  # no resources: request = limit = the reservation
        ({"limits": {"memory": "64Mi"}}, None),  # below the reservation: raised to it
        ({"limits": {"memory": "64Gi"}, "requests": {"cpu": "2"}}, "64Gi"),  # above: kept
    ],
)


@memory_policies
def test_stage_requests_the_memory_the_plan_reserves(
    resources: dict[str, Any], limit: str | None
) -> None:
    spec = a_spec().runtime(resources=resources).build()
    for stage in a_plan(spec)["stages"]:
        pod = stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")["spec"][
            "template"
        ]["spec"]
        got = pod["containers"][0]["resources"]
        reserved = str(stage["memoryBytes"])
        assert got["requests"]["memory"] == reserved
        assert got["limits"]["memory"] == (limit or reserved)
        if "cpu" in (resources.get("requests") or {}):
            assert got["requests"]["cpu"] == "2"


def test_download_container_fetches_the_stage_slice_with_the_spec_env() -> None:
    spec = (
        a_spec()
        .hugging_face("org/tiny")
        .runtime(
            env=[
                {"name": "HF_ENDPOINT", "value": "https://mirror.local"},
                {"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
            ]
        )
        .build()
    )
    plan = a_plan(spec)
    flags = []
    for stage in plan["stages"]:
        pod = stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")["spec"][
            "template"
        ]["spec"]
        (init,) = pod["initContainers"]
        command = init["command"]
        at = command.index("--layer-start")
        assert command[at : at + 4] == [
            "--layer-start",
            str(stage["layerStart"]),
            "--layer-end",
            str(stage["layerEnd"]),
        ]
        flags.append(("--embedding" in command, "--head" in command))
        env = {e["name"]: e.get("value") for e in init["env"]}
        assert env["HF_ENDPOINT"] == "https://mirror.local"
        assert env["HTTPS_PROXY"] == "http://proxy:3128"
        assert env["HOME"] == "/tmp"
    assert len(flags) >= 2
    assert flags[0] == (True, False) and flags[-1] == (False, True)
    assert all(f == (False, False) for f in flags[1:-1])


gguf_sources = pytest.mark.parametrize(
    "location, file_in_pod",
    [
        ({"hostPath": "/var/lib/models/smol.Q4_1.gguf"}, "/gguf/smol.Q4_1.gguf"),
        (
            {"pvc": {"claimName": "models", "path": "smol/smol.Q4_1.gguf"}},
            "/gguf/smol/smol.Q4_1.gguf",
        ),
        (
            {
                "huggingFace": {
                    "id": "org/smol-GGUF",
                    "filename": "smol.Q4_1.gguf",
                    "tokenSecret": {"name": "hf"},
                }
            },
            "/models/gguf/smol.Q4_1.gguf",
        ),
    ],
    ids=["hostPath", "pvc", "huggingFace"],
)


@gguf_sources
def test_gguf_source_converts_in_an_init_container(location: dict, file_in_pod: str) -> None:
    spec = a_spec().gguf(**location).build()
    assert spec.model.model_dir == "/models/model"
    stage = a_plan(spec)["stages"][0]
    pod = stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")["spec"]["template"][
        "spec"
    ]
    init = pod["initContainers"]
    convert = init[-1]
    assert convert["name"] == "convert-gguf"
    assert convert["command"] == [
        "python", "-m", "llmpipe_stage.gguf_convert", file_in_pod,
        "--out", "/models/model", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert convert["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["model"] and volumes["model"]["emptyDir"]["sizeLimit"]
    mounts = {m["name"]: m for m in convert["volumeMounts"]}
    assert mounts["model"]["mountPath"] == "/models" and not mounts["model"].get("readOnly")
    stage_mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert stage_mounts["model"]["readOnly"] is True
    assert pod["containers"][0]["command"][-1] == "/models/model"
    if "huggingFace" in location:
        fetch = init[0]
        assert fetch["name"] == "fetch-gguf" and len(init) == 2
        assert fetch["command"][3:] == ["org/smol-GGUF", "main", "smol.Q4_1.gguf", "/models/gguf"]
        assert {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
        } in fetch["env"]
        assert all(e["name"] != "HF_TOKEN" for e in convert["env"])
        assert "gguf" not in volumes
    else:
        assert len(init) == 1
        assert mounts["gguf"]["readOnly"] is True
        if "hostPath" in location:
            assert volumes["gguf"]["hostPath"] == {"path": location["hostPath"], "type": "File"}
            assert mounts["gguf"]["mountPath"] == file_in_pod
        else:
            assert volumes["gguf"]["persistentVolumeClaim"] == {
                "claimName": "models",
                "readOnly": True,
            }
            assert mounts["gguf"]["mountPath"] == "/gguf"


def test_stage_services_publish_not_ready_addresses() -> None:
    """The last stage returns tokens to stage 0 through stage 0's Service: the ring must not
    depend on stage 0's readiness (which reports the whole pipeline)."""
    spec = a_spec().build()
    plan = a_plan(spec)
    for stage in plan["stages"]:
        service = stages.build_stage_service(REF, stage, digest="abcd1234")
        assert service["spec"]["publishNotReadyAddresses"] is True
    # The user-facing Service still follows readiness.
    user = endpoint.build_endpoint_service(REF, spec, serving_digest="abcd1234")
    assert "publishNotReadyAddresses" not in user["spec"]


def test_api_keys_are_a_secret_volume_on_stage_zero_only() -> None:
    spec = a_spec().service(auth={"apiKeySecret": "chat-keys"}, maxPromptCharacters=5000).build()
    plan = a_plan(spec)
    pods = [
        stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")["spec"]["template"][
            "spec"
        ]
        for stage in plan["stages"]
    ]
    first = pods[0]["containers"][0]
    command = first["command"]
    assert command[command.index("--api-keys") + 1] == stages.API_KEYS_DIR
    assert command[command.index("--max-prompt-chars") + 1] == "5000"
    assert "--protect-metrics" not in command
    assert command[-2] == "--model-dir"
    mount = next(m for m in first["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": stages.API_KEYS_DIR, "readOnly": True}
    volume = next(v for v in pods[0]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"] == {"secretName": "chat-keys", "defaultMode": 0o440}
    # Keys never as env (no restart on rotation), and never on the other stages.
    assert all("chat-keys" not in json.dumps(e) for e in first["env"])
    for pod in pods[1:]:
        assert "api-keys" not in json.dumps(pod)
        assert "--max-prompt-chars" not in pod["containers"][0]["command"]


def test_metrics_protection_and_the_open_default() -> None:
    protected = a_spec().service(auth={"apiKeySecret": "k", "protectMetrics": True}).build()
    stage = a_plan(protected)["stages"][0]
    pod = stages.build_stage_deployment(REF, protected, stage, digest="abcd1234")
    assert "--protect-metrics" in pod["spec"]["template"]["spec"]["containers"][0]["command"]
    open_spec = a_spec().build()
    pod = stages.build_stage_deployment(REF, open_spec, stage, digest="abcd1234")
    command = pod["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--api-keys" not in command
    assert command[command.index("--max-prompt-chars") + 1] == "1000000"
    assert all(v["name"] != "api-keys" for v in pod["spec"]["template"]["spec"]["volumes"])


def test_the_download_size_limit_holds_the_whole_model_at_float32_and_little_more() -> None:
    spec = a_spec().hugging_face("org/tiny").build()
    profile = spec.profile()  # bfloat16: 2 bytes per parameter
    params = profile.total_weight_bytes // 2
    limit = model_files.download_size_limit(model_files.model_files(spec))
    assert params * 4 < limit <= params * 4 + 256 * 2**20
