//! Kubernetes metadata for `--kubernetes`: the pods of this node, watched on
//! the API server (in-cluster service account, or `KUBECONFIG`), kept as a
//! small index from pod UID and container ID to the labels their processes'
//! profiles get. The watch runs in its own task; the agent only reads the
//! index, so a slow or unreachable API server never holds up sampling, and
//! profiles ship meanwhile with what is known (container ID, node).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};

use crate::process::containers::Container;

/// What `--kubernetes` needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// This node's name: only its pods are watched.
    pub node: String,
    /// Pod labels copied onto profiles (`app.kubernetes.io/name` becomes
    /// `app_kubernetes_io_name`).
    pub pod_labels: Vec<String>,
}

/// A pod as the profiles of its processes see it.
#[derive(Debug)]
struct PodEntry {
    /// `namespace`, `pod` and the chosen pod labels.
    labels: BTreeMap<String, String>,
    /// Container ID (without its `containerd://` scheme) to container name.
    containers: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct Index {
    by_uid: HashMap<String, PodEntry>,
}

/// The node's pods, as last seen; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Pods {
    index: Arc<RwLock<Index>>,
    /// Bumped on every change, so that the agent looks again only then.
    generation: Arc<AtomicU64>,
}

impl Pods {
    /// Starts watching the pods of `settings.node`. Fails only when no API
    /// server is configured at all; one that is down is retried with backoff.
    pub async fn watch(settings: &KubernetesSettings) -> anyhow::Result<Pods> {
        let client = Client::try_default().await.map_err(|error| {
            anyhow::anyhow!(
                "--kubernetes: no Kubernetes API server to ask ({error}); the agent finds one from its \
                 service account in a pod, or from KUBECONFIG"
            )
        })?;
        let pods = Pods::default();
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node));
        let stream = watcher(Api::<Pod>::all(client), config).default_backoff();
        let (index, generation, settings) = (pods.index.clone(), pods.generation.clone(), settings.clone());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // A relist builds a new index, which replaces the old one when complete.
            let mut relisted: Option<Index> = None;
            let mut failing = false;
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        if !failing {
                            log::warn!("kubernetes: watching pods: {error}; retrying, profiles ship without pod labels meanwhile");
                        }
                        failing = true;
                        continue;
                    }
                };
                if failing && matches!(event, watcher::Event::InitDone) {
                    log::info!("kubernetes: watching pods again");
                    failing = false;
                }
                let mut index = index.write().expect("kubernetes index lock");
                match event {
                    watcher::Event::Init => relisted = Some(Index::default()),
                    watcher::Event::InitApply(pod) => {
                        if let Some((uid, entry)) = entry(&pod, &settings.pod_labels) {
                            relisted.get_or_insert_with(Index::default).by_uid.insert(uid, entry);
                        }
                        continue;
                    }
                    watcher::Event::InitDone => {
                        *index = relisted.take().unwrap_or_default();
                        log::info!("kubernetes: {} pods on node {}", index.by_uid.len(), settings.node);
                    }
                    watcher::Event::Apply(pod) => {
                        if let Some((uid, entry)) = entry(&pod, &settings.pod_labels) {
                            index.by_uid.insert(uid, entry);
                        }
                    }
                    watcher::Event::Delete(pod) => {
                        if let Some(uid) = pod.metadata.uid {
                            index.by_uid.remove(&uid);
                        }
                    }
                }
                generation.fetch_add(1, Ordering::Release);
            }
        });
        Ok(pods)
    }

    /// Changes with every change to the pods.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The labels of a process in `container`: `namespace`, `pod`,
    /// `container` and the chosen pod labels, when its pod is known.
    pub fn labels(&self, container: &Container) -> Option<BTreeMap<String, String>> {
        let index = self.index.read().expect("kubernetes index lock");
        let id = container.id.as_deref();
        let pod = match container.pod_uid.as_deref() {
            Some(uid) => index.by_uid.get(uid),
            None => index.by_uid.values().find(|pod| id.is_some_and(|id| pod.containers.contains_key(id))),
        }?;
        let mut labels = pod.labels.clone();
        if let Some(name) = id.and_then(|id| pod.containers.get(id)) {
            labels.insert("container".to_owned(), name.clone());
        }
        Some(labels)
    }
}

/// The index entry of `pod`, by its UID.
fn entry(pod: &Pod, pod_labels: &[String]) -> Option<(String, PodEntry)> {
    let metadata = &pod.metadata;
    let uid = metadata.uid.clone()?;
    let mut labels = BTreeMap::new();
    labels.insert("namespace".to_owned(), metadata.namespace.clone()?);
    labels.insert("pod".to_owned(), metadata.name.clone()?);
    for key in pod_labels {
        if let Some(value) =
            metadata.labels.as_ref().and_then(|labels| labels.get(key)).filter(|value| !value.is_empty())
        {
            labels.insert(label_name(key), value.clone());
        }
    }
    let status = pod.status.iter();
    let statuses = status.flat_map(|status| {
        [&status.container_statuses, &status.init_container_statuses, &status.ephemeral_container_statuses]
            .into_iter()
            .flatten()
            .flatten()
    });
    let containers = statuses
        .filter_map(|container| {
            // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
            let id = container.container_id.as_deref()?.rsplit_once("://")?.1;
            Some((id.to_owned(), container.name.clone()))
        })
        .collect();
    Some((uid, PodEntry { labels, containers }))
}

/// A pod label's key as a profile label's name: what is not a letter, a
/// digit or `_` becomes `_` (`app.kubernetes.io/name`: `app_kubernetes_io_name`).
pub fn label_name(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_label_keys_become_label_names() {
        assert_eq!(label_name("app.kubernetes.io/name"), "app_kubernetes_io_name");
        assert_eq!(label_name("team"), "team");
    }

    #[test]
    fn a_pod_is_indexed_by_uid_with_its_containers() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                         "labels": {"app.kubernetes.io/name": "web", "other": "x"}},
            "status": {"containerStatuses": [
                {"name": "app", "containerID": "containerd://abc", "image": "i", "imageID": "",
                 "ready": true, "restartCount": 0},
                {"name": "starting", "image": "i", "imageID": "", "ready": false, "restartCount": 0}
            ]}
        }))
        .unwrap();
        let (uid, entry) = entry(&pod, &["app.kubernetes.io/name".to_owned(), "absent".to_owned()]).unwrap();
        assert_eq!(uid, "u-1");
        let labels: Vec<_> = entry.labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
        assert_eq!(labels, ["app_kubernetes_io_name=web", "namespace=shop", "pod=web-1"]);
        assert_eq!(entry.containers, HashMap::from([("abc".to_owned(), "app".to_owned())]));
        let pods = Pods::default();
        pods.index.write().unwrap().by_uid.insert(uid, entry);
        let by_id = Container { id: Some("abc".into()), pod_uid: None };
        assert_eq!(pods.labels(&by_id).unwrap()["container"], "app");
        let unknown = Container { id: Some("def".into()), pod_uid: Some("u-2".into()) };
        assert_eq!(pods.labels(&unknown), None);
    }
}
