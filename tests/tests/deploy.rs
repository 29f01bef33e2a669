//! The deployment files (`deploy/`): the Kubernetes manifests render with `kubectl
//! kustomize` and validate against the schemas of several Kubernetes versions
//! (kubernetes-validate, offline, strict); the DaemonSet asks for the privileges it documents
//! and no more, the same as the systemd unit; the agent accepts the configuration files and
//! the command lines they come with; the unit passes `systemd-analyze verify`; and the
//! release tarball of `cargo xtask dist` holds a static agent that runs in an empty root, as
//! in the `FROM scratch` image of `deploy/container/Containerfile`.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Kubernetes versions the manifests are validated for: the first with the `appArmorProfile`
/// field they use, a recent one, and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 3] = ["1.30", "1.34", "1.37"];

/// The capabilities the DaemonSet and the unit grant, as Kubernetes names them.
const CAPABILITIES: [&str; 6] = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "CHECKPOINT_RESTORE", "SYSLOG"];

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The tools' Python environment, made by `cargo xtask setup --test`.
fn tools_bin(name: &str) -> PathBuf {
    repository().join("target/tools/venv/bin").join(name)
}

/// Whether the tools of a test are installed: commands (on `PATH`) and files of the tools'
/// Python environment (`venv:NAME`). See [`e2e::tool_installed`].
fn installed(tools: &[&str]) -> Result<bool> {
    for tool in tools {
        let (tool, install) = match tool.strip_prefix("venv:") {
            Some(name) => (
                tools_bin(name).to_str().context("a UTF-8 path")?.to_owned(),
                "run `cargo xtask setup --test`, which installs it in the tools' Python environment".to_owned(),
            ),
            None => {
                let package = match *tool {
                    "kubectl" => "kubernetes-client",
                    "systemd-analyze" => "systemd",
                    "setpriv" => "util-linux",
                    other => other,
                };
                ((*tool).to_owned(), format!("run `cargo xtask setup --test`, or `apt-get install {package}`"))
            }
        };
        if !e2e::tool_installed(&tool, &install)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs `command`, failing with its output unless it succeeds.
fn run(command: &mut Command) -> Result<Output> {
    let output = command.output().with_context(|| format!("starting {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?}: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// A command of the deployment tests, or a failure saying how to install it.
fn tool(name: &str, package: &str) -> Result<Command> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| fs::metadata(dir.join(name)).is_ok_and(|meta| meta.permissions().mode() & 0o111 != 0));
    ensure!(
        found,
        "{name} is not installed: `cargo xtask setup --test` installs it (Debian: apt-get install {package})"
    );
    Ok(Command::new(name))
}

/// `kubectl kustomize DIR`, as YAML, and its documents read as JSON.
fn kustomize(dir: &str) -> Result<(String, Vec<Value>)> {
    let output = run(tool("kubectl", "kubernetes-client")?.arg("kustomize").arg(repository().join(dir)))?;
    let yaml = String::from_utf8(output.stdout)?;
    // PyYAML comes with kubernetes-validate.
    let python = tools_bin("python");
    let mut child = Command::new(&python)
        .args(["-c", "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} (`cargo xtask setup --test` makes it)", python.display()))?;
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "reading the YAML of {dir}: {}", String::from_utf8_lossy(&output.stderr));
    let documents: Vec<Value> = serde_json::from_slice(&output.stdout)?;
    Ok((yaml, documents))
}

/// Validates rendered manifests with kubernetes-validate, offline and strict (unknown fields
/// are errors), for every version of [`KUBERNETES_VERSIONS`].
fn validate(name: &str, yaml: &str, documents: &[Value]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(format!("{}.yaml", name.replace('/', "-")));
    fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
    let validator = tools_bin("kubernetes-validate");
    ensure!(validator.is_file(), "{} is missing: `cargo xtask setup --test` installs it", validator.display());
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .arg(&file)
            // Offline: the schemas ship with the package; any download would fail.
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .output()?;
        let report = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        ensure!(output.status.success(), "{name} does not validate for Kubernetes {version}:\n{report}");
        let passed = report.lines().filter(|line| line.contains(" passed for resource ")).count();
        ensure!(
            passed == documents.len(),
            "{name}: {passed} of {} documents passed for Kubernetes {version}:\n{report}",
            documents.len()
        );
    }
    Ok(())
}

/// The one document of `kind`.
fn only<'a>(documents: &'a [Value], kind: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = documents.iter().filter(|document| document["kind"] == kind).collect();
    ensure!(found.len() == 1, "{} documents of kind {kind}, not 1", found.len());
    Ok(found[0])
}

fn kinds(documents: &[Value]) -> BTreeSet<String> {
    documents.iter().map(|document| document["kind"].as_str().unwrap_or("?").to_owned()).collect()
}

/// Every object under `value` that has `key` set to `true`, as JSON paths.
fn true_keys(value: &Value, key: &str, path: &str, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (name, child) in map {
                let child_path = format!("{path}.{name}");
                if name == key && child == &Value::Bool(true) {
                    found.push(child_path.clone());
                }
                true_keys(child, key, &child_path, found);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                true_keys(child, key, &format!("{path}[{index}]"), found);
            }
        }
        _ => {}
    }
}

/// The workspace's version, from its Cargo.toml.
fn workspace_version() -> Result<String> {
    let manifest = fs::read_to_string(repository().join("Cargo.toml"))?;
    let section = manifest.split("[workspace.package]").nth(1).context("no [workspace.package]")?;
    let line = section.lines().find(|line| line.starts_with("version")).context("no version")?;
    Ok(line.split('"').nth(1).context("version not quoted")?.to_owned())
}

/// The values of `key=` lines of the systemd unit, split on spaces.
fn unit_values(key: &str) -> Result<Vec<String>> {
    let unit = fs::read_to_string(repository().join("deploy/systemd/ferroscope.service"))?;
    let prefix = format!("{key}=");
    let lines: Vec<&str> = unit.lines().filter_map(|line| line.strip_prefix(&prefix)).collect();
    ensure!(lines.len() == 1, "{} lines {key}= in the unit, not 1", lines.len());
    Ok(lines[0].split_whitespace().map(str::to_owned).collect())
}

#[test]
fn kubernetes_base_renders_and_validates() -> Result<()> {
    if !installed(&["kubectl", "venv:python", "venv:kubernetes-validate"])? {
        return Ok(());
    }
    let (yaml, documents) = kustomize("deploy/kubernetes/base")?;
    let expected: BTreeSet<String> =
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
            .map(str::to_owned)
            .into();
    ensure!(kinds(&documents) == expected, "kinds {:?}, expected {expected:?}", kinds(&documents));
    validate("base", &yaml, &documents)
}

#[test]
fn kubernetes_pyroscope_example_renders_and_validates() -> Result<()> {
    if !installed(&["kubectl", "venv:python", "venv:kubernetes-validate"])? {
        return Ok(());
    }
    let (yaml, documents) = kustomize("deploy/kubernetes/examples/pyroscope")?;
    validate("examples/pyroscope", &yaml, &documents)?;
    // The overlay's config.toml replaces the base's, and the DaemonSet mounts it.
    let config_map = only(&documents, "ConfigMap")?;
    let config = config_map["data"]["config.toml"].as_str().context("no config.toml in the ConfigMap")?;
    for setting in ["url = \"http://pyroscope.pyroscope.svc:4040\"", "frequency = 99", "period = \"15s\"", "[labels]"] {
        ensure!(config.contains(setting), "the example's config.toml lacks {setting:?}:\n{config}");
    }
    let daemonset = only(&documents, "DaemonSet")?;
    let mounted = &daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("no volumes")?
        .iter()
        .find(|volume| volume["name"] == "config")
        .context("no config volume")?["configMap"]["name"];
    ensure!(mounted == &config_map["metadata"]["name"], "the DaemonSet mounts {mounted}, not the example's ConfigMap");
    Ok(())
}

#[test]
fn daemonset_has_the_documented_privileges_and_no_more() -> Result<()> {
    if !installed(&["kubectl", "venv:python"])? {
        return Ok(());
    }
    let (_, documents) = kustomize("deploy/kubernetes/base")?;
    let daemonset = only(&documents, "DaemonSet")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    let mut privileged = Vec::new();
    true_keys(daemonset, "privileged", "DaemonSet", &mut privileged);
    ensure!(privileged.is_empty(), "privileged: true at {privileged:?}");
    ensure!(pod["hostPID"] == true, "hostPID is {}", pod["hostPID"]);
    for shared in ["hostNetwork", "hostIPC"] {
        ensure!(pod[shared].is_null() || pod[shared] == false, "{shared} is {}", pod[shared]);
    }
    ensure!(pod["priorityClassName"].is_null(), "priorityClassName is {}", pod["priorityClassName"]);
    ensure!(pod["tolerations"] == serde_json::json!([{"operator": "Exists"}]), "tolerations {}", pod["tolerations"]);
    ensure!(
        daemonset["spec"]["updateStrategy"]
            == serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}),
        "updateStrategy {}",
        daemonset["spec"]["updateStrategy"]
    );

    let containers = pod["containers"].as_array().context("no containers")?;
    ensure!(containers.len() == 1, "{} containers", containers.len());
    let container = &containers[0];
    let security = &container["securityContext"];
    ensure!(security["runAsUser"] == 0, "runAsUser {}", security["runAsUser"]);
    ensure!(
        security["allowPrivilegeEscalation"] == false,
        "allowPrivilegeEscalation {}",
        security["allowPrivilegeEscalation"]
    );
    ensure!(
        security["readOnlyRootFilesystem"] == true,
        "readOnlyRootFilesystem {}",
        security["readOnlyRootFilesystem"]
    );
    ensure!(
        security["capabilities"]["drop"] == serde_json::json!(["ALL"]),
        "drop {}",
        security["capabilities"]["drop"]
    );
    let added: BTreeSet<&str> = security["capabilities"]["add"]
        .as_array()
        .context("no capabilities added")?
        .iter()
        .map(|capability| capability.as_str().unwrap_or("?"))
        .collect();
    ensure!(added == BTreeSet::from(CAPABILITIES), "capabilities added: {added:?}, expected {CAPABILITIES:?}");
    ensure!(security["seccompProfile"]["type"] == "Unconfined", "seccompProfile {}", security["seccompProfile"]);
    ensure!(security["appArmorProfile"]["type"] == "Unconfined", "appArmorProfile {}", security["appArmorProfile"]);
    let annotation = &daemonset["spec"]["template"]["metadata"]["annotations"]
        ["container.apparmor.security.beta.kubernetes.io/ferroscope"];
    ensure!(annotation == "unconfined", "AppArmor annotation {annotation}");

    // The agent, its health probes and its metrics port.
    let args: Vec<&str> = container["args"].as_array().context("no args")?.iter().filter_map(Value::as_str).collect();
    ensure!(
        args == [
            "agent",
            "--config",
            "/etc/ferroscope/config.toml",
            "--kubernetes",
            "--metrics-address",
            "0.0.0.0:9464"
        ],
        "args {args:?}"
    );
    let ports = container["ports"].as_array().context("no ports")?;
    ensure!(
        ports.iter().any(|port| port["name"] == "metrics" && port["containerPort"] == 9464),
        "no port metrics = 9464: {ports:?}"
    );
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let get = &container[probe]["httpGet"];
        ensure!(get["path"] == "/healthz" && get["port"] == "metrics", "{probe}: {}", container[probe]);
    }
    let env = container["env"].as_array().context("no env")?;
    ensure!(
        env.iter()
            .any(|var| var["name"] == "FERROSCOPE_NODE_NAME"
                && var["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "no FERROSCOPE_NODE_NAME from spec.nodeName: {env:?}"
    );
    let version = workspace_version()?;
    ensure!(
        container["image"] == format!("ghcr.io/ferroscope/ferroscope:{version}"),
        "image {}, not of version {version}",
        container["image"]
    );
    let resources = &container["resources"];
    ensure!(
        resources
            == &serde_json::json!({"requests": {"cpu": "50m", "memory": "64Mi"},
                                         "limits": {"cpu": "500m", "memory": "256Mi"}}),
        "resources {resources}"
    );

    // Mounts: where each volume goes, read-only or not, and what it is on the host.
    let volumes = pod["volumes"].as_array().context("no volumes")?;
    let volume = |name: &str| volumes.iter().find(|volume| volume["name"] == name);
    let mounts = container["volumeMounts"].as_array().context("no volumeMounts")?;
    let mut seen = BTreeSet::new();
    for mount in mounts {
        let name = mount["name"].as_str().context("a mount without a name")?;
        let read_only = mount["readOnly"] == true;
        let volume = volume(name).with_context(|| format!("mount {name} without a volume"))?;
        let (path, host_path, host_type) =
            (&mount["mountPath"], &volume["hostPath"]["path"], &volume["hostPath"]["type"]);
        let expected = match name {
            "config" => {
                volume["configMap"]["name"].as_str().is_some_and(|n| n.starts_with("ferroscope-config"))
                    && path == "/etc/ferroscope"
                    && read_only
            }
            "btf" => path == "/sys/kernel/btf" && host_path == "/sys/kernel/btf" && read_only,
            "state" => {
                path == "/var/lib/ferroscope" && host_path == "/var/lib/ferroscope" && host_type == "DirectoryOrCreate"
            }
            "run" => path == "/run/ferroscope" && host_path == "/run/ferroscope" && host_type == "DirectoryOrCreate",
            _ => bail!("unexpected mount {mount} of {volume}"),
        };
        ensure!(expected, "mount {mount} of {volume}");
        seen.insert(name);
    }
    ensure!(seen == BTreeSet::from(["config", "btf", "state", "run"]), "mounts {seen:?}");
    ensure!(volumes.len() == mounts.len(), "volumes without mounts: {volumes:?}");

    // Read-only access to pods, and nothing else.
    let role = only(&documents, "ClusterRole")?;
    ensure!(
        role["rules"]
            == serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]),
        "ClusterRole rules {}",
        role["rules"]
    );
    let binding = only(&documents, "ClusterRoleBinding")?;
    ensure!(
        binding["subjects"]
            == serde_json::json!([{"kind": "ServiceAccount", "name": "ferroscope", "namespace": "ferroscope"}])
            && pod["serviceAccountName"] == "ferroscope",
        "binding {binding}, service account {}",
        pod["serviceAccountName"]
    );
    Ok(())
}

#[test]
fn systemd_unit_grants_the_daemonsets_capabilities() -> Result<()> {
    let expected: BTreeSet<String> = CAPABILITIES.iter().map(|name| format!("CAP_{name}")).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let granted: BTreeSet<String> = unit_values(key)?.into_iter().collect();
        ensure!(granted == expected, "{key}: {granted:?}, expected {expected:?}");
    }
    ensure!(unit_values("DynamicUser")? == ["yes"], "the unit runs as root");
    ensure!(unit_values("NoNewPrivileges")? == ["yes"], "NoNewPrivileges is not set");
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> Result<()> {
    if !installed(&["systemd-analyze"])? {
        return Ok(());
    }
    // A root holding the unit, the system's units it refers to, and an executable where
    // ExecStart expects the agent.
    let root = tempfile::tempdir()?;
    let units = Path::new("/usr/lib/systemd/system");
    ensure!(units.is_dir(), "{} is missing: install systemd (apt-get install systemd)", units.display());
    let mut analyze = tool("systemd-analyze", "systemd")?;
    fs::create_dir_all(root.path().join("usr/lib/systemd"))?;
    run(Command::new("cp").arg("-a").arg(units).arg(root.path().join("usr/lib/systemd/")))?;
    let bin = root.path().join("usr/local/bin");
    fs::create_dir_all(&bin)?;
    fs::write(bin.join("ferroscope"), "#!/bin/sh\n")?;
    fs::set_permissions(bin.join("ferroscope"), fs::Permissions::from_mode(0o755))?;
    let system = root.path().join("etc/systemd/system");
    fs::create_dir_all(&system)?;
    fs::copy(repository().join("deploy/systemd/ferroscope.service"), system.join("ferroscope.service"))?;

    let output = run(analyze
        .args(["verify", "--man=no", "--generators=no"])
        .arg(format!("--root={}", root.path().display()))
        .arg("/etc/systemd/system/ferroscope.service"))?;
    // Unknown keys and bad values are only warnings: any message is a failure here.
    let messages = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    ensure!(messages.trim().is_empty(), "systemd-analyze verify:\n{messages}");

    // The sandbox, as systemd scores its exposure (0 is the most locked down, 10 the least;
    // the threshold is in tenths): 2.8 when written; over 3.0 means an option was lost.
    run(tool("systemd-analyze", "systemd")?
        .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
        .arg(format!("--root={}", root.path().display()))
        .arg("/etc/systemd/system/ferroscope.service"))?;
    Ok(())
}

/// Runs the agent with `args` as user nobody without any capability: settings (flags and
/// file) are read first, so an accepted configuration ends at the privilege check.
fn agent_accepts(args: &[&str], config: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777))?;
    let file = dir.path().join("config.toml");
    fs::write(&file, config)?;
    let mut args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    for arg in args.iter_mut() {
        if arg.ends_with("config.toml") {
            *arg = file.to_str().unwrap().to_owned();
        }
    }
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all", "--inh-caps=-all"])
        .arg(e2e::ferroscope_bin())
        .args(&args)
        // The directories of the file are the host's, which nobody cannot write to.
        .args(["--output-dir", &format!("{}/profiles", dir.path().display())])
        .args(["--spool-dir", &format!("{}/spool", dir.path().display())])
        .args(["--control-socket", &format!("{}/control.sock", dir.path().display())])
        .env("FERROSCOPE_NODE_NAME", "node-a")
        .output()
        .context("running the agent under setpriv")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("CAP_BPF") && !stderr.contains("config"),
        "`ferroscope {}` with\n{config}\nshould stop at the missing capabilities; {}, stderr:\n{stderr}",
        args.join(" "),
        output.status
    );
    Ok(())
}

#[test]
fn agent_accepts_the_deployments_settings() -> Result<()> {
    if !installed(&["kubectl", "venv:python", "setpriv"])? {
        return Ok(());
    }
    let (_, base) = kustomize("deploy/kubernetes/base")?;
    let (_, example) = kustomize("deploy/kubernetes/examples/pyroscope")?;
    let daemonset = only(&base, "DaemonSet")?;
    let args: Vec<&str> = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("no args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for (name, documents) in [("base", &base), ("examples/pyroscope", &example)] {
        let config = only(documents, "ConfigMap")?["data"]["config.toml"].as_str().context("no config.toml")?;
        agent_accepts(&args, config).with_context(|| format!("the ConfigMap of {name}"))?;
    }
    let exec_start = unit_values("ExecStart")?;
    ensure!(exec_start[0] == "/usr/local/bin/ferroscope", "ExecStart runs {}", exec_start[0]);
    let exec_args: Vec<&str> = exec_start[1..].iter().map(String::as_str).collect();
    let unit_config = fs::read_to_string(repository().join("deploy/systemd/config.toml"))?;
    ensure!(exec_args.contains(&"/etc/ferroscope/config.toml"), "ExecStart does not read /etc/ferroscope/config.toml");
    agent_accepts(&exec_args, &unit_config).context("deploy/systemd/config.toml")?;
    // The check itself: a bad file is refused before the capabilities are.
    ensure!(agent_accepts(&exec_args, "frequency = 100\nno_such_key = 1\n").is_err(), "a bad config was accepted");
    Ok(())
}

/// The program interpreter (`PT_INTERP`) an x86-64 ELF executable asks for, if any.
fn elf_interpreter(data: &[u8]) -> Result<Option<String>> {
    let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes(b.try_into().unwrap()));
    let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |at: usize| data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    ensure!(data.starts_with(b"\x7fELF\x02\x01"), "not a 64-bit little-endian ELF file");
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        bail!("truncated ELF header");
    };
    const PT_INTERP: u32 = 3;
    for index in 0..usize::from(phnum) {
        let header = phoff + index * usize::from(phentsize);
        if u32_at(header).context("truncated program header")? == PT_INTERP {
            let (offset, size) = (u64_at(header + 8).unwrap_or(0), u64_at(header + 32).unwrap_or(0));
            let path = data.get(offset..offset + size).context("truncated PT_INTERP")?;
            return Ok(Some(String::from_utf8_lossy(path).trim_end_matches('\0').to_owned()));
        }
    }
    Ok(None)
}

#[test]
fn release_tarball_holds_a_static_agent_that_runs_in_an_empty_root() -> Result<()> {
    if let Some(error) = std::env::var_os("FERROSCOPE_DIST_ERROR") {
        bail!("cargo xtask dist failed: {}", error.to_string_lossy());
    }
    let tarball = PathBuf::from(std::env::var_os("FERROSCOPE_DIST").context(
        "FERROSCOPE_DIST is not set: run the end-to-end tests with `cargo xtask test`, which builds the \
         tarball with `cargo xtask dist`, or set it to target/dist/ferroscope-VERSION-x86_64-linux.tar.gz",
    )?);
    let version = workspace_version()?;
    let name = format!("ferroscope-{version}-x86_64-linux");
    ensure!(tarball.file_name() == Some(format!("{name}.tar.gz").as_ref()), "tarball {}", tarball.display());
    let unpacked = tempfile::tempdir()?;
    run(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(unpacked.path()))?;
    let top = unpacked.path().join(&name);
    for file in [
        "ferroscope",
        "README.md",
        "deploy/kubernetes/base/kustomization.yaml",
        "deploy/kubernetes/base/daemonset.yaml",
        "deploy/kubernetes/examples/pyroscope/kustomization.yaml",
        "deploy/systemd/ferroscope.service",
        "deploy/systemd/config.toml",
        "deploy/container/Containerfile",
    ] {
        ensure!(top.join(file).is_file(), "{file} is not in {}", tarball.display());
    }

    let binary = fs::read(top.join("ferroscope"))?;
    if let Some(interpreter) = elf_interpreter(&binary)? {
        bail!("the agent is not static: it asks for {interpreter}");
    }
    // What `FROM scratch` gives it: a root holding the binary alone.
    let root = tempfile::tempdir()?;
    fs::copy(top.join("ferroscope"), root.path().join("ferroscope"))?;
    fs::set_permissions(root.path().join("ferroscope"), fs::Permissions::from_mode(0o755))?;
    let in_root = |args: &[&str]| run(Command::new("chroot").arg(root.path()).arg("/ferroscope").args(args));
    let help = String::from_utf8(in_root(&["--help"])?.stdout)?;
    ensure!(help.contains("Usage: ferroscope"), "--help in an empty root:\n{help}");
    let agent_help = String::from_utf8(in_root(&["agent", "--help"])?.stdout)?;
    ensure!(agent_help.contains("--kubernetes") && agent_help.contains("--config"), "agent --help:\n{agent_help}");
    let printed = String::from_utf8(in_root(&["--version"])?.stdout)?;
    ensure!(printed.trim() == format!("ferroscope {version}"), "--version says {printed:?}");
    Ok(())
}
