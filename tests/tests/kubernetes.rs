//! `--kubernetes`: the agent watches its node's pods on the API server (here a fake one on
//! loopback, `tests/receivers/kube_api.py`, serving recorded pods; the agent's client is
//! the real one) and labels the profiles of a process in a pod's container, found by its
//! cgroup as the kubelet and containerd name them, with the pod's namespace, name,
//! container and labels. With the API server down, profiles still ship with what is known.

use std::{fs, path::Path, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use e2e::{free_port, new_container_id, share_labelled, Agent, AgentRun, Cgroup, Profile, Workload, PYENV_PYTHON_3_11};
use serde_json::{json, Value};

const NODE: &str = "node-a";
const TOKEN: &str = "service-account-token";
/// The fake API server sends the workload's pod this long after the watch starts.
const POD_STARTUP: Duration = Duration::from_millis(500);
/// How long a busy host may take to get the pod to the agent.
const POD_TIMEOUT: Duration = Duration::from_secs(30);

/// A pod on `node` whose container `app` is `container_id`.
fn pod(name: &str, uid: &str, node: &str, container_id: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "resourceVersion": "1",
                     "labels": {"app.kubernetes.io/name": "checkout", "pod-template-hash": "5d8f"}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "python:3.11"}]},
        "status": {"phase": "Running", "containerStatuses": [
            {"name": "app", "containerID": format!("containerd://{container_id}"), "image": "python:3.11",
             "imageID": "", "ready": true, "restartCount": 0}]}
    })
}

/// A kubeconfig for an API server on loopback at `port`, with a bearer token.
fn kubeconfig(dir: &Path, port: u16) -> Result<String> {
    let path = dir.join("kubeconfig");
    fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: agent\n  user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: agent\ncurrent-context: fake\n"
        ),
    )?;
    Ok(path.to_str().context("temp dir path")?.to_owned())
}

/// Runs `spin.py` for 2 s in the cgroup of pod `uid`'s container `container_id` (systemd
/// cgroup driver, as the kubelet makes it), in its own PID and mount namespaces, under an
/// agent with `--kubernetes` and `KUBECONFIG=kubeconfig`; with `api` (the fake API server
/// and the pod it sends), once the API server has sent the pod. Returns the agent's run and
/// the workload's samples.
fn profile_in_pod(
    uid: &str,
    container_id: &str,
    kubeconfig: &str,
    api: Option<(&mut Workload, &str)>,
) -> Result<(AgentRun, Profile, u32)> {
    let cgroup = Cgroup::create(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container_id}.scope",
        uid.replace('-', "_")
    ))?;
    let mut command = Command::new(e2e::ferroscope_bin());
    command.env("KUBECONFIG", kubeconfig);
    let args = [
        "--kubernetes",
        "--kubernetes-node",
        NODE,
        "--kubernetes-pod-label",
        "app.kubernetes.io/name",
        "--period",
        "60s",
    ];
    let agent = Agent::start_command(command, &args)?;
    // A pod is known before its processes start: the kubelet starts them once the API
    // server has it. Once it has sent it, not after a fixed wait, which a busy host may
    // outlast (the agent reads the event as it comes, a moment later).
    if let Some((api, pod)) = api {
        api.wait_for_line(&format!("sent ADDED {pod}"), POD_TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let workload = Workload::start_in_container("/", Some(&cgroup), PYENV_PYTHON_3_11, "spin.py", &["2"])?;
    let pid = workload.pid();
    workload.wait()?;
    std::thread::sleep(Duration::from_millis(200));
    let run = agent.stop()?;
    let profile = run.all_profiles()?;
    Ok((run, profile, pid))
}

#[test]
fn profiles_of_a_pod_carry_its_namespace_name_container_and_labels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (uid, container_id) = ("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0", new_container_id());
    // Listed at once: a pod of another container. Watched a moment later: the workload's.
    let other = pod("web-0", "11111111-2222-4333-8444-555555555555", NODE, &new_container_id());
    let pods = json!({
        "list": [other],
        "watch": [{"after": POD_STARTUP.as_secs_f64(), "type": "ADDED", "object": pod("checkout-5d8f-x2x", uid, NODE, &container_id)}],
    });
    fs::write(dir.path().join("pods.json"), pods.to_string())?;
    let port = free_port()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("receivers/kube_api.py");
    let (records, pods_file, port_text) =
        (dir.path().to_str().unwrap(), dir.path().join("pods.json"), port.to_string());
    let mut api = Workload::start_program(
        Path::new(PYENV_PYTHON_3_11),
        &[script.to_str().unwrap(), records, pods_file.to_str().unwrap(), &port_text],
        &[],
    )?;
    api.wait_for_line(&format!("listening {port}"), Duration::from_secs(10))?;

    let api = Some((&mut api, "checkout-5d8f-x2x"));
    let (run, profile, pid) = profile_in_pod(uid, &container_id, &kubeconfig(dir.path(), port)?, api)?;
    let samples: Vec<_> = profile.samples_of_pid(pid).collect();
    let count: i64 = samples.iter().map(|sample| sample.count()).sum();
    // ~200 at 100 Hz.
    ensure!(count >= 50, "{count} samples of pid {pid}; agent output:\n{}", run.log);

    let expected = [
        ("namespace", "shop"),
        ("pod", "checkout-5d8f-x2x"),
        ("container", "app"),
        ("app_kubernetes_io_name", "checkout"),
        ("node", NODE),
        ("container_id", container_id.as_str()),
        ("container_pid", "1"),
    ];
    let labelled = share_labelled(&samples, &expected).with_context(|| format!("pid {pid}"))?;
    ensure!(labelled >= 0.95, "pid {pid}: {:.0}% of the samples carry {expected:?}", labelled * 100.0);
    for sample in &samples {
        ensure!(sample.label("pod_template_hash").is_none(), "an unasked pod label: {:?}", sample.labels);
    }
    // Only this node's pods, with the service account's token.
    let requests = fs::read_to_string(dir.path().join("requests.jsonl"))?;
    let requests: Vec<Value> = requests.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    ensure!(requests.iter().any(|request| request["query"]["watch"] == "true"), "no watch: {requests:?}");
    for request in &requests {
        ensure!(request["query"]["fieldSelector"] == format!("spec.nodeName={NODE}"), "{request}");
        ensure!(request["authorization"] == format!("Bearer {TOKEN}"), "{request}");
    }
    Ok(())
}

#[test]
fn profiles_ship_with_what_is_known_when_the_api_server_is_down() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (uid, container_id) = ("9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", new_container_id());
    let (run, profile, pid) = profile_in_pod(uid, &container_id, &kubeconfig(dir.path(), free_port()?)?, None)?;
    let samples: Vec<_> = profile.samples_of_pid(pid).collect();
    let count: i64 = samples.iter().map(|sample| sample.count()).sum();
    // ~200 at 100 Hz.
    ensure!(count >= 50, "{count} samples of pid {pid}; agent output:\n{}", run.log);

    for sample in &samples {
        ensure!(sample.label("node") == Some(NODE) && sample.label("pod").is_none(), "pid {pid}: {:?}", sample.labels);
    }
    // Read from /proc: the samples taken as the process starts, before it can be read, may
    // lack it (more of them when a busy host delays the agent), never have another.
    let expected = [("container_id", container_id.as_str())];
    let labelled = share_labelled(&samples, &expected).with_context(|| format!("pid {pid}"))?;
    ensure!(labelled >= 0.95, "pid {pid}: {:.0}% of the samples carry {expected:?}", labelled * 100.0);
    ensure!(
        run.log.contains("kubernetes: watching pods"),
        "the agent did not say the API server is down:\n{}",
        run.log
    );
    Ok(())
}
