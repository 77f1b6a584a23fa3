"""Issue 6, build and move: the Bento builds with the model it serves, travels as a file to an empty
BentoML home, and serves the same top-k from a folder outside the repository, laid out as
`bentoml containerize` lays out the image; the model alone travels with its metadata; the Kubernetes
manifests hold together.

No container engine runs here: the image's requirements are not installed anywhere, the Bento is
served with this virtual environment, as the image's entrypoint would serve it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import random
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import bentoml
import httpx
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, serving
from packaging.requirements import Requirement

from recbole_bento.core import store
from recbole_bento.settings import Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # BentoML requires tomli on 3.10
    import tomli as tomllib

K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.29"  # the oldest Kubernetes the manifests are meant for (autoscaling/v2, policy/v1)
APP_PORT = 3000  # `bentoml serve`'s default, which the image's entrypoint keeps
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
COMPAT_PINS = ("recbole", "numpy", "pandas", "pydantic")


def bentoml_cli(*args: str, home: Path | None = None, cwd: Path = ROOT, **env: str) -> str:
    run_env = {**os.environ, **env}
    if home is not None:
        run_env["BENTOML_HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", *args],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"bentoml {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build(model_tag: str, *args: str) -> bentoml.Bento:
    out = bentoml_cli("build", *args, "--output", "tag", ".", RECBOLE_BENTO_MODEL=model_tag)
    tag = re.search(r"__tag__:(\S+)", out)
    assert tag, out
    return bentoml.get(tag.group(1))


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def requirement_lines(bento: bentoml.Bento) -> list[str]:
    text = Path(bento.path_of("env/python/requirements.txt")).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def cpu_bento(sasrec_tag: str) -> bentoml.Bento:
    return build(sasrec_tag)


# ------------------------------------------------------------------ bentofile


def test_bentofiles_pin_what_the_tests_run():
    cpu = read_yaml(ROOT / "bentofile.yaml")
    cuda = read_yaml(ROOT / "deploy" / "bentofile.cuda.yaml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {Requirement(r).name: r for r in project if Requirement(r).name in COMPAT_PINS}
    assert set(pinned) == set(COMPAT_PINS)
    for bentofile in (cpu, cuda):
        assert bentofile["service"] == "service:Recommender"
        assert bentofile["python"]["lock_packages"] is False
        assert bentofile["docker"]["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
        packages = bentofile["python"]["packages"]
        # The image gets the project's compatibility pins (numpy<2, pandas<3 for RecBole 1.2.1) ...
        assert set(pinned.values()) <= set(packages)
        # ... which admit what the tests run with.
        assert f"recbole=={version('recbole')}" in packages
        for name, requirement in pinned.items():
            assert Requirement(requirement).specifier.contains(version(name)), requirement
    # The same image but for torch's build: the CPU wheel from PyTorch's CPU index, the CUDA one from
    # the default index; both the version this environment tests.
    torch_version = version("torch").split("+")[0]
    assert "torch==" + torch_version + "+cpu" in cpu["python"]["packages"]
    assert cpu["python"]["extra_index_url"] == ["https://download.pytorch.org/whl/cpu"]
    assert "torch==" + torch_version in cuda["python"]["packages"]
    assert "extra_index_url" not in cuda["python"] and "index_url" not in cuda["python"]
    strip_torch = [p for p in cpu["python"]["packages"] if not p.startswith("torch")]
    assert strip_torch == [p for p in cuda["python"]["packages"] if not p.startswith("torch")]
    for key in ("include", "exclude", "service", "docker"):
        assert cpu[key] == cuda[key], key


def test_build_carries_the_model_the_sources_and_a_dockerfile(cpu_bento, sasrec_tag):
    info = read_yaml(Path(cpu_bento.path_of("bento.yaml")))
    assert info["name"] == "recbole-bento" and info["labels"]["image"] == "cpu"
    # In-process, the CPU default for a small catalogue (edge/topology.py): the Ranker is not declared,
    # so not packed; the public service carries the model.
    assert {s["name"]: [m["tag"] for m in s["models"]] for s in info["services"]} == {
        "recbole_recommender": [sasrec_tag],
    }
    src = Path(cpu_bento.path_of("src"))
    shipped = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    package = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "recbole_bento").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {"service.py", "import_model.py", *package} <= shipped
    assert not {
        p for p in shipped if p.split("/")[0] in {"tests", "bench", "demo", "deploy", "docs", "devtools"}
    }
    assert not {p for p in shipped if "__pycache__" in p or p.startswith(".")}

    requirements = requirement_lines(cpu_bento)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    for pin in read_yaml(ROOT / "bentofile.yaml")["python"]["packages"]:
        assert pin in requirements
    assert f"bentoml=={version('bentoml')}" in requirements

    dockerfile = Path(cpu_bento.path_of("env/docker/Dockerfile")).read_text()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.search(rf"^FROM python:{re.escape(python)}-slim\b", dockerfile, re.M), dockerfile[:400]
    install = re.search(r"^.*uv .*pip install -r \$BENTO_PATH/env/python/requirements\.txt", dockerfile, re.M)
    assert install, dockerfile
    # The envs the bentofile sets are in the image before the install step that needs them.
    for name, value in (("UV_INDEX_STRATEGY", "unsafe-best-match"), ("RECBOLE_BENTO_JSON_LOGS", "1")):
        arg = dockerfile.index(f"ARG {name}={value}\n")
        assert dockerfile.index(f"ENV {name}=${name}\n") < install.start() and arg < install.start()
    assert "USER bentoml" in dockerfile and f"EXPOSE {APP_PORT}" in dockerfile
    assert re.search(r'^ENTRYPOINT \[ "/home/bentoml/bento/env/docker/entrypoint.sh" \]', dockerfile, re.M)
    entrypoint = Path(cpu_bento.path_of("env/docker/entrypoint.sh")).read_text()
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in entrypoint


def test_cuda_build_differs_only_in_torch(sasrec_tag, cpu_bento):
    cuda = build(sasrec_tag, "-f", "deploy/bentofile.cuda.yaml")
    info = read_yaml(Path(cuda.path_of("bento.yaml")))
    assert info["name"] == "recbole-bento-cuda" and info["labels"]["image"] == "cuda"
    assert {m["tag"] for s in info["services"] for m in s["models"]} == {sasrec_tag}
    torch_version = version("torch").split("+")[0]
    cuda_reqs, cpu_reqs = requirement_lines(cuda), requirement_lines(cpu_bento)
    assert f"torch=={torch_version}" in cuda_reqs
    assert not any("+cpu" in r or "whl/cpu" in r for r in cuda_reqs)
    assert [r for r in cuda_reqs if "torch" not in r] == [r for r in cpu_reqs if "torch" not in r]
    dockerfile = Path(cuda.path_of("env/docker/Dockerfile")).read_text()
    assert "ENV NVIDIA_DRIVER_CAPABILITIES=$NVIDIA_DRIVER_CAPABILITIES" in dockerfile
    assert sorted(p.name for p in Path(cuda.path_of("src")).rglob("*.py")) == sorted(
        p.name for p in Path(cpu_bento.path_of("src")).rglob("*.py")
    )


# ------------------------------------------------------------------ export, import, serve elsewhere

# What `bentoml containerize` hands to `docker build`: the Bento with its models copied in.
BUILD_CONTEXT = """
import shutil, sys
import bentoml
from bentoml._internal.container import construct_containerfile
with construct_containerfile(bentoml.get(sys.argv[1]), enable_buildkit=True) as (context, _):
    shutil.copytree(context, sys.argv[2])
"""


def sample_bodies(item_tokens: list[str], n: int = 12) -> list[dict]:
    rng = random.Random(6)
    known = item_tokens[1:]
    bodies = [
        {"sequence": rng.sample(known, rng.randint(1, 30)), "topk": rng.choice([1, 5, 10, 20])}
        for _ in range(n)
    ]
    bodies[1]["exclude_seen"] = True
    bodies[2]["sequence"].append("no-such-item")
    bodies[3]["candidates"] = rng.sample(known, 40)
    bodies.append({"sequence": ["no-such-item"], "topk": 5})  # popularity fallback
    return bodies


def answers(url: str, bodies: list[dict]) -> list[dict]:
    with httpx.Client(base_url=url, timeout=60) as client:
        single = [client.post("/recommend", json=body) for body in bodies]
        batch = client.post("/recommend_batch", json={"requests": bodies})
    assert all(r.status_code == 200 for r in single), [r.text for r in single if r.status_code != 200]
    assert batch.status_code == 200, batch.text
    return [r.json() for r in single] + batch.json()["results"]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["item_list"] == w["item_list"] and g["fallback"] == w["fallback"], (g, w)
        assert g["unknown_items"] == w["unknown_items"]
        assert g["score_list"] == pytest.approx(w["score_list"], abs=1e-5)


@pytest.mark.server
def test_exported_bento_serves_the_same_topk_outside_the_repo(cpu_bento, sasrec_tag, sasrec_server, tmp_path):
    archive = tmp_path / "recbole-bento.bento"
    bentoml_cli("export", str(cpu_bento.tag), str(archive))
    assert archive.stat().st_size > 0

    second_home = tmp_path / "second-home"  # another machine's empty BentoML home
    bentoml_cli("import", str(archive), home=second_home)
    listed = json.loads(bentoml_cli("list", "-o", "json", home=second_home))
    assert [b["tag"] for b in listed] == [str(cpu_bento.tag)]
    models = json.loads(bentoml_cli("models", "list", "-o", "json", home=second_home))
    assert [m["tag"] for m in models] == [sasrec_tag]

    context = tmp_path / "image"
    subprocess.run(
        [sys.executable, "-c", BUILD_CONTEXT, str(cpu_bento.tag), str(context)],
        env={**os.environ, "BENTOML_HOME": str(second_home)},
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    name, model_version = sasrec_tag.split(":")
    assert (context / "models" / name / model_version / "model.yaml").is_file()
    assert (context / "src" / "service.py").is_file() and (context / "env/docker/Dockerfile").is_file()
    assert not context.resolve().is_relative_to(ROOT)

    # As the image runs it: an empty BentoML home, the envs the image sets, no model named, the
    # entrypoint's `bentoml serve $BENTO_PATH`.
    image_envs = {e["name"]: e["value"] for e in read_yaml(context / "bento.yaml")["envs"]}
    empty_home = tmp_path / "container-home"
    empty_home.mkdir()
    item_tokens = store.load(bentoml.models.get(sasrec_tag), load_weights=False).item_tokens
    bodies = sample_bodies(item_tokens)
    with serving(
        sasrec_tag,
        cwd=context,
        RECBOLE_BENTO_MODEL="",
        BENTOML_HOME=str(empty_home),
        BENTO_PATH=str(context),
        RECBOLE_BENTO_ACCESS_LOG="1",  # off as shipped; on here to check its lines are JSON too
        **image_envs,
    ) as url:
        info = httpx.post(f"{url}/model_info", json={}, timeout=60).json()
        assert info["tag"] == sasrec_tag
        from_image = answers(url, bodies)
        page = httpx.get(f"{url}/playground/playground.js", timeout=30)  # the page's files ship too
        assert page.status_code == 200 and "textContent" in page.text
    assert_same(from_image, answers(sasrec_server, bodies))

    # RECBOLE_BENTO_JSON_LOGS=1 from the image: every process logs one JSON object per line.
    lines = [line for line in serving.last_log.splitlines() if line.strip()]  # type: ignore[attr-defined]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r["logger"] == "recbole_bento" and sasrec_tag in r["message"] for r in records)
    assert any(r["logger"] == "bentoml.access" and "/recommend_batch" in r["message"] for r in records)
    not_json = [line for line in lines if not line.startswith("{")]
    assert not [line for line in not_json if re.match(r"^\d{4}-\d\d-\d\dT", line)], not_json[:5]


# ------------------------------------------------------------------ model promotion


def describe(model: bentoml.Model) -> dict:
    store.load(model)  # every file checked against the sha256 recorded at import
    info = model.info
    described = {
        "tag": str(model.tag),
        "labels": info.labels,
        "metadata": info.metadata,
        "created": info.creation_time.isoformat(),
        "module": info.module,
    }
    return json.loads(json.dumps(described, default=str))


# The same describe(), run in a process whose BentoML home is another machine's.
DESCRIBE = f"""
import json, sys
import bentoml
from recbole_bento.core import store
{inspect.getsource(describe)}
print(json.dumps(describe(bentoml.models.get(sys.argv[1]))))
"""


def model_info_in(home: Path, tag: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", DESCRIBE, tag],
        env={**os.environ, "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_model_export_import_carries_its_metadata(sasrec_tag, tmp_path):
    archive = tmp_path / "model.bentomodel"
    bentoml_cli("models", "export", sasrec_tag, str(archive))
    other_home = tmp_path / "other-home"
    bentoml_cli("models", "import", str(archive), home=other_home)
    there = model_info_in(other_home, sasrec_tag)
    assert there == describe(bentoml.models.get(sasrec_tag))
    assert there["metadata"]["format"] == store.FORMAT and there["metadata"]["files"]


# ------------------------------------------------------------------ Kubernetes

MERGE_KEYS = {"containers": "name", "env": "name", "ports": "name"}  # Kubernetes' patchMergeKey


def merge(base: object, patch: object, key: str | None = None) -> object:
    """The part of a strategic merge patch these manifests use: maps merge, named lists by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        by_name = {item[MERGE_KEYS[key]]: item for item in base}
        for item in patch:
            name = item[MERGE_KEYS[key]]
            by_name[name] = merge(by_name[name], item) if name in by_name else item
        return list(by_name.values())
    return patch


def key_of(doc: dict) -> str:
    """The service's own objects by kind ("Deployment"), the others by kind and name."""
    name = doc["metadata"]["name"]
    return doc["kind"] if name == "recbole-bento" else f"{doc['kind']}/{name}"


def render(overlay: str) -> dict[str, dict]:
    """kubectl kustomize, for the features deploy/k8s uses: resources, patches, images."""
    folder = K8S / overlay
    kustomization = read_yaml(folder / "kustomization.yaml")
    docs: dict[str, dict] = {}
    for resource in kustomization.get("resources", []):
        path = folder / resource
        if path.is_dir():
            docs.update(render(f"{overlay}/{resource}"))
        else:
            for doc in yaml.safe_load_all(path.read_text()):
                docs[key_of(doc)] = doc
    for patch in kustomization.get("patches", []):
        doc = read_yaml(folder / patch["path"])
        target = docs[key_of(doc)]
        assert target["metadata"]["name"] == doc["metadata"]["name"]
        docs[key_of(doc)] = merge(target, doc)  # type: ignore[assignment]
    for image in kustomization.get("images", []):
        for container in docs["Deployment"]["spec"]["template"]["spec"]["containers"]:
            if container["image"] == image["name"]:
                container["image"] = f"{image['newName']}:{image['newTag']}"
    for pairs in kustomization.get("labels", []):
        for doc in docs.values():
            doc["metadata"].setdefault("labels", {}).update(pairs["pairs"])
    return copy.deepcopy(docs)


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def quantity(value: str | int) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_manifests(overlay):
    docs = render(overlay)
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # unknown or misplaced fields fail

    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": APP_PORT}
    assert container["args"] == ["--port", str(APP_PORT)]
    probes = {kind: container[kind]["httpGet"] for kind in PROBES}
    assert probes["readinessProbe"] == {"path": "/readyz", "port": "http"}
    assert probes["startupProbe"] == {"path": "/readyz", "port": "http"}
    assert probes["livenessProbe"] == {"path": "/livez", "port": "http"}

    # Every RECBOLE_BENTO_* variable is a real setting with a valid value.
    env = env_of(container)
    settings = Settings.from_env(env)
    ours = {k for k in env if k.startswith("RECBOLE_BENTO_")}
    assert ours and {k.removeprefix("RECBOLE_BENTO_").lower() for k in ours} <= set(vars(settings))
    assert settings.json_logs == 1

    # Kubernetes' SIGKILL comes after the preStop pause plus the service's own drain, not before.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert int(pre_stop[1]) > container["readinessProbe"]["periodSeconds"]  # out of rotation first
    assert settings.drain_s < settings.shutdown_grace_s
    drain = int(pre_stop[1]) + settings.shutdown_grace_s
    assert settings.shutdown_grace_s > 0
    assert drain < pod["spec"]["terminationGracePeriodSeconds"] <= drain + 15

    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert quantity(resources["requests"][kind]) <= quantity(resources["limits"][kind])
    assert 0 < settings.torch_threads <= quantity(resources["limits"]["cpu"])
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(APP_PORT)
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0

    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "recbole-bento"}
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and "cpu" in resources["requests"]  # utilization needs it
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()

    image = container["image"]
    assert ":" in image and not image.endswith(":latest")
    if overlay == "gpu":
        assert image.split(":")[0].endswith("-cuda")
        assert resources["limits"]["nvidia.com/gpu"] == 1 and settings.device == "cuda"
    else:
        assert "nvidia.com/gpu" not in resources["limits"] and settings.device == "cpu"


def test_kubernetes_redis_overlay_shares_the_sessions():
    """deploy/k8s/redis: the CPU deployment with every replica's sessions in one Redis."""
    docs = render("redis")
    cpu = render("cpu")
    assert set(docs) == set(cpu) | {"Deployment/recbole-bento-redis", "Service/recbole-bento-redis"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    (app,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = env_of(app)
    settings = Settings.from_env(env)
    assert {k: v for k, v in env.items() if "SESSION" not in k} == env_of(
        cpu["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    )
    redis = docs["Deployment/recbole-bento-redis"]
    service = docs["Service/recbole-bento-redis"]
    (port,) = service["spec"]["ports"]
    assert settings.session_store == f"redis://{service['metadata']['name']}:{port['port']}/0"
    assert 0 < settings.session_timeout_ms <= 1000
    pod = redis["spec"]["template"]
    assert redis["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {port["targetPort"]: 6379}
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"]["type"] == "Recreate"
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    args = container["args"]
    maxmemory = quantity(args[args.index("--maxmemory") + 1].replace("mb", "Mi"))
    assert maxmemory < quantity(
        container["resources"]["limits"]["memory"]
    )  # Redis evicts before the OOM killer
    assert args[args.index("--maxmemory-policy") + 1].startswith(
        "volatile-"
    )  # only keys with a TTL: sessions
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {m["mountPath"] for m in container["volumeMounts"]} == {args[args.index("--dir") + 1]}
