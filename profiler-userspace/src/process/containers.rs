//! Which container a process runs in, from its cgroup path: the container
//! runtimes (Docker, containerd, CRI-O, podman) name a container's cgroup after
//! its ID, and the kubelet names a pod's after its UID, with either cgroup
//! driver (cgroupfs: `/kubepods/burstable/pod<uid>/<id>`; systemd:
//! `kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`).

use std::sync::Arc;

/// What a process's cgroup says of its container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Container {
    /// The runtime's container ID: 64 hex digits.
    pub id: Option<Arc<str>>,
    /// The Kubernetes pod's UID, when the kubelet made the cgroup.
    pub pod_uid: Option<Arc<str>>,
}

/// The container of process `pid`, if it runs in one.
pub fn of_process(pid: u32) -> Option<Container> {
    parse(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// Reads `/proc/PID/cgroup` (`hierarchy:controllers:path` lines, cgroup v1
/// and v2). The innermost container wins: a container in a container (Docker
/// in Docker, kind) is labelled with its own ID. Paths may start with `/..`
/// when the reader sits in another cgroup namespace, as a DaemonSet's pod does.
pub fn parse(cgroup: &str) -> Option<Container> {
    let paths = cgroup.lines().filter_map(|line| line.splitn(3, ':').nth(2));
    let mut found = Container::default();
    for path in paths {
        let components = || path.split('/').rev();
        if found.id.is_none() {
            found.id = components().find_map(container_id).map(Arc::from);
        }
        if found.pod_uid.is_none() {
            found.pod_uid = components().find_map(pod_uid).map(Arc::from);
        }
    }
    (found != Container::default()).then_some(found)
}

/// The ID in `<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope` or `libpod-<id>.scope`; not in `crio-conmon-<id>.scope`,
/// the runtime's monitor beside the container.
fn container_id(component: &str) -> Option<&str> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    let (prefix, id) = name.rsplit_once('-').unwrap_or(("", name));
    let is_id = id.len() == 64 && id.bytes().all(|byte| byte.is_ascii_hexdigit());
    (is_id && !prefix.ends_with("conmon")).then_some(id)
}

/// The UID in `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd).
fn pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let (_, uid) = name.rsplit_once("pod")?;
    let uid = uid.replace('_', "-");
    let is_uid = uid.len() == 36
        && uid
            .char_indices()
            .all(|(at, c)| if matches!(at, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() });
    is_uid.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1a9c0b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const INNER: &str = "aa4e1a9c0b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const UID: &str = "8a1c2b3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d";

    fn parsed(cgroup: &str) -> (Option<String>, Option<String>) {
        let container = parse(cgroup).unwrap_or_default();
        (container.id.map(|id| id.to_string()), container.pod_uid.map(|uid| uid.to_string()))
    }

    /// `/proc/PID/cgroup` as each runtime and cgroup driver leaves it.
    #[test]
    fn recorded_paths_of_each_runtime() {
        let id = || Some(ID.to_owned());
        let uid = || Some(UID.to_owned());
        let systemd_uid = UID.replace('-', "_");
        for (cgroup, expected) in [
            // Docker, cgroup v1, cgroupfs driver.
            (format!("12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n"), (id(), None)),
            // Docker, cgroup v2, systemd driver.
            (format!("0::/system.slice/docker-{ID}.scope\n"), (id(), None)),
            // containerd under Kubernetes, cgroup v2, systemd driver.
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope\n"
                ),
                (id(), uid()),
            ),
            // containerd under Kubernetes, cgroup v1, cgroupfs driver.
            (format!("4:memory:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"), (id(), uid())),
            // Guaranteed QoS has no QoS level in its path.
            (format!("0::/kubepods.slice/kubepods-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"), (id(), uid())),
            // CRI-O, cgroup v2.
            (format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice/crio-{ID}.scope"), (id(), uid())),
            // Podman, rootful then rootless, cgroup v2.
            (format!("0::/machine.slice/libpod-{ID}.scope/container\n"), (id(), None)),
            (
                format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"),
                (id(), None),
            ),
            // Podman, cgroup v1, cgroupfs.
            (format!("3:cpu:/libpod_parent/libpod-{ID}\n"), (id(), None)),
            // Seen from the agent's own cgroup namespace (a DaemonSet pod).
            (format!("0::/../../kubepods-besteffort-pod{systemd_uid}.slice/cri-containerd-{ID}.scope\n"), (id(), uid())),
            // Docker in Docker: the innermost container.
            (format!("0::/docker/{ID}/docker/{INNER}\n"), (Some(INNER.to_owned()), None)),
        ] {
            assert_eq!(parsed(&cgroup), expected, "{cgroup}");
        }
    }

    #[test]
    fn not_containers() {
        for cgroup in [
            "0::/\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "0::/system.slice/nginx.service\n",
            "9:name=systemd:/\n4:memory:/process_api/6f837f6a4ca92834973434c634ae3779\n0::/\n",
            // The runtime's monitor, beside the container.
            &format!("0::/machine.slice/libpod-conmon-{ID}.scope\n"),
            "",
        ] {
            assert_eq!(parse(cgroup), None, "{cgroup}");
        }
    }
}
