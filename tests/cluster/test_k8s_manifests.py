"""deploy/k8s/ cannot rot: every object validates against the Kubernetes API's schemas
(kubernetes-validate, strict: unknown fields are errors) for the versions below, the
pieces agree with each other and with chorus (ports, labels, probes, grace period, env
names the binary reads), and the pinned smg accepts the router's arguments."""

import glob
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import kubernetes_validate
import pytest
import yaml

BIN = os.environ.get("CHORUS_BIN", "target/release/chorus")
VERSIONS = ["1.33.0", "1.37.0"]


def documents():
    docs = []
    for path in sorted(glob.glob("deploy/k8s/*.yaml")):
        with open(path) as f:
            docs += [(path, d) for d in yaml.safe_load_all(f) if d]
    return docs


def objects():
    return [(p, d) for (p, d) in documents() if d["kind"] != "Kustomization"]


def find(kind, name):
    found = [d for (_, d) in objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(deployment, name):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"]
                if c["name"] == name)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_against_the_api_schemas(version):
    checked = 0
    for path, doc in objects():
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 8


def test_kustomization_lists_every_manifest():
    kustomization = [d for (_, d) in documents() if d["kind"] == "Kustomization"]
    assert len(kustomization) == 1
    files = {os.path.basename(p) for p in glob.glob("deploy/k8s/*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization[0]["resources"]) == files


def test_the_worker_deployment_fits_chorus():
    deploy = find("Deployment", "chorus")
    pod = deploy["spec"]["template"]
    c = container(deploy, "chorus")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    port = c["ports"][0]["containerPort"]
    assert env["CHORUS_PORT"] == str(port) and env["CHORUS_HOST"] == "0.0.0.0"
    # Every CHORUS_* variable set is one the binary reads.
    helptext = subprocess.run([BIN, "--help"], capture_output=True, text=True, check=True).stdout
    for name in env:
        if name.startswith("CHORUS_"):
            assert f"[env: {name}=" in helptext, f"chorus does not read {name}"
    for init in pod["spec"].get("initContainers", []):
        for e in init.get("env", []):
            if e["name"].startswith("CHORUS_"):
                assert f"[env: {e['name']}=" in helptext, e["name"]
    # Probes on /health (503 while loading and draining), on the serving port.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        assert c[probe]["httpGet"]["path"] == "/health", probe
        assert c[probe]["httpGet"]["port"] in ("http", port), probe
    # Running streams get their grace before SIGKILL.
    grace = int(env["CHORUS_SHUTDOWN_GRACE"])
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace + pause
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(port) and notes["prometheus.io/path"] == "/metrics"
    assert c["resources"]["requests"]["cpu"] == env["CHORUS_THREADS"]
    # The Service selects these pods.
    service = find("Service", "chorus")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def router_args():
    deploy = find("Deployment", "chorus-router")
    c = container(deploy, "smg")
    assert c["command"] == ["smg", "launch"]
    return deploy, c, c["args"]


def test_the_router_finds_the_workers():
    deploy, c, args = router_args()
    workers = find("Deployment", "chorus")
    labels = workers["spec"]["template"]["metadata"]["labels"]
    i = args.index("--selector")
    selector = []
    for a in args[i + 1:]:
        if a.startswith("--"):
            break
        selector.append(a)
    assert selector and all(s.split("=", 1)[1] == labels.get(s.split("=", 1)[0])
                            for s in selector), (selector, labels)
    port = container(workers, "chorus")["ports"][0]["containerPort"]
    assert f"--service-discovery-port={port}" in args
    # It may watch pods, under its own account.
    role = find("Role", "chorus-router")
    assert {"get", "list", "watch"} <= set(role["rules"][0]["verbs"])
    binding = find("RoleBinding", "chorus-router")
    account = deploy["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"][0]["name"] == account
    find("ServiceAccount", account)
    router_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert f"--port={router_port}" in args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_pinned_router_accepts_the_manifest_arguments(tmp_path):
    """smg started with the manifest's arguments (loopback addresses and free ports in
    place of the pod's) comes up and answers its probes' paths; outside a cluster its
    service discovery finds nothing, which it logs and carries on."""
    _, c, args = router_args()
    port, metrics_port = free_port(), free_port()
    local = {"--host": "127.0.0.1", "--port": str(port), "--prometheus-host": "127.0.0.1",
             "--prometheus-port": str(metrics_port)}
    argv = []
    for a in args:
        key = a.split("=", 1)[0]
        argv.append(f"{key}={local[key]}" if key in local else a)
    argv = [re.sub(r"\$\(POD_NAMESPACE\)", "default", a) for a in argv]
    env = dict(os.environ, POD_NAMESPACE="default", KUBECONFIG=str(tmp_path / "none"))
    log = open(tmp_path / "smg.log", "w")
    smg = os.path.join(os.path.dirname(sys.executable), "smg")
    proc = subprocess.Popen([smg, *c["command"][1:], *argv], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 30
        status = None
        while time.time() < deadline and status is None:
            assert proc.poll() is None, open(tmp_path / "smg.log").read()[-3000:]
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/liveness").status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                time.sleep(0.2)
        assert status == 200, status
        for path in ["/readiness", "/liveness"]:
            try:
                code = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}").status
            except urllib.error.HTTPError as e:
                code = e.code
            assert code != 404, path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
