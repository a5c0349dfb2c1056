//! Live `TenantPolicy` objects from Kubernetes: a reflector (list, then watch, resumed from the last resource
//! version, backoff on errors — the pattern of the router's pod discovery) keeps a store of every policy; after each
//! change the full set is validated and swapped into [`Admission`] with [`Admission::replace_policies`], and each
//! object's status is written back (observed generation, an `Accepted` condition, the tenant's usage summary).
//!
//! An object whose new spec is invalid (alone, or because it clashes with another: same tenant name, same API key)
//! gets `Accepted=False` with the validation error, and its previous valid spec stays in effect; a deleted object's
//! tenant is removed. Queued and in-flight requests are never dropped by a policy change.
//!
//! API keys held in Secrets (`identity.apiKeys[].secretRef`) are not read by this watcher yet: such a policy is
//! accepted with its inline hashes only, and its condition message says so.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use policies::tenant::{PolicyCondition, TenantPolicy, TenantPolicySpec, validate_all};
use serde_json::json;

use crate::Admission;

/// Condition type written on every policy.
pub const ACCEPTED: &str = "Accepted";

/// Watches `TenantPolicy` objects and applies them to an [`Admission`].
pub struct PolicyWatcher {
    /// API client (a cluster, or a mock transport in tests).
    client: Client,
    /// Namespace to watch; `None` = all namespaces.
    namespace: Option<String>,
    /// Where policies take effect.
    admission: Admission,
}

/// (namespace, name) of an object.
type ObjKey = (String, String);

/// What the watcher decided for one object.
#[derive(Debug, Clone, PartialEq)]
struct Verdict {
    /// Spec in effect for this object (the new one, the last good one, or none).
    in_effect: Option<TenantPolicySpec>,
    /// `None` = accepted; `Some(msg)` = rejected with this message.
    error: Option<String>,
    /// A note for accepted policies (e.g. Secret keys not read).
    note: Option<String>,
}

impl PolicyWatcher {
    /// A watcher of `namespace` (or every namespace).
    pub fn new(client: Client, namespace: Option<String>, admission: Admission) -> Self {
        Self {
            client,
            namespace,
            admission,
        }
    }

    fn api(&self) -> Api<TenantPolicy> {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Runs until the watch stream ends (never, against a live API server: errors are retried with backoff).
    pub async fn run(self) {
        let (store, writer) = reflector::store::<TenantPolicy>();
        let mut events =
            reflector::reflector(writer, watcher(self.api(), watcher::Config::default()))
                .default_backoff()
                .boxed();
        let mut listed = false;
        let mut last_good: BTreeMap<ObjKey, TenantPolicySpec> = BTreeMap::new();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {}
                Ok(watcher::Event::InitDone) => listed = true,
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "TenantPolicy watch error; retrying with backoff");
                    continue;
                }
            }
            if listed {
                self.apply(&store, &mut last_good).await;
            }
        }
    }

    /// Validates the stored set, swaps it into admission and writes statuses.
    async fn apply(
        &self,
        store: &Store<TenantPolicy>,
        last_good: &mut BTreeMap<ObjKey, TenantPolicySpec>,
    ) {
        let mut objs: Vec<Arc<TenantPolicy>> = store.state();
        objs.sort_by_key(|o| key_of(o));
        last_good.retain(|k, _| objs.iter().any(|o| key_of(o) == *k));
        let verdicts = decide(&objs, last_good);
        let set: Vec<TenantPolicySpec> = verdicts
            .iter()
            .filter_map(|v| v.in_effect.clone())
            .collect();
        match self.admission.replace_policies(set) {
            Ok(()) => {
                tracing::info!(
                    policies = verdicts.iter().filter(|v| v.in_effect.is_some()).count(),
                    "tenant policies applied"
                )
            }
            // `decide` already resolved every clash; this is a bug guard, keep the old set.
            Err(e) => {
                tracing::error!(error = %e, "tenant policy set refused; keeping the previous one")
            }
        }
        for (obj, v) in objs.iter().zip(&verdicts) {
            if v.error.is_none() {
                last_good.insert(key_of(obj), obj.spec.clone());
            }
            self.write_status(obj, v).await;
        }
    }

    /// Patches the status subresource when it differs from what the object shows.
    async fn write_status(&self, obj: &TenantPolicy, v: &Verdict) {
        let generation = obj.metadata.generation;
        let (status, reason, message) = match (&v.error, &v.note) {
            (Some(e), _) => ("False", "InvalidSpec", e.clone()),
            (None, Some(n)) => ("True", "Valid", n.clone()),
            (None, None) => ("True", "Valid", "The policy is in effect.".to_string()),
        };
        let old = obj
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
        let unchanged = old
            .is_some_and(|c| c.status == status && c.reason == reason && c.message == message)
            && obj.status.as_ref().and_then(|s| s.observed_generation) == generation;
        if unchanged {
            return;
        }
        let transition = match old {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            // The watcher is a shell: it reads the wall clock for the condition's timestamp.
            _ => k8s_openapi::chrono::Utc::now()
                .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true),
        };
        let cond = PolicyCondition {
            type_: ACCEPTED.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: transition,
        };
        let usage = self.admission.ledger().summary(&obj.spec.tenant);
        let patch = json!({"status": {"observedGeneration": generation, "conditions": [cond], "usage": usage}});
        let api: Api<TenantPolicy> = match obj.namespace() {
            Some(ns) => Api::namespaced(self.client.clone(), &ns),
            None => Api::all(self.client.clone()),
        };
        if let Err(e) = api
            .patch_status(
                &obj.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::warn!(policy = %obj.name_any(), error = %e, "could not write TenantPolicy status");
        }
    }
}

fn key_of(o: &TenantPolicy) -> ObjKey {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// Per object (sorted by key): the spec in effect and whether its current spec is accepted. Pure.
fn decide(
    objs: &[Arc<TenantPolicy>],
    last_good: &BTreeMap<ObjKey, TenantPolicySpec>,
) -> Vec<Verdict> {
    let mut verdicts: Vec<Verdict> = objs
        .iter()
        .map(|o| match o.spec.validate() {
            Ok(rules) => Verdict {
                in_effect: Some(o.spec.clone()),
                error: None,
                note: (!rules.secret_keys.is_empty()).then(|| {
                    "In effect with its inline key hashes; keys in Secrets (secretRef) are not read yet.".to_string()
                }),
            },
            Err(e) => Verdict { in_effect: last_good.get(&key_of(o)).cloned(), error: Some(e.to_string()), note: None },
        })
        .collect();
    // Clashes between objects (same tenant, shared key): the later object (by key) loses; it falls back to its
    // last good spec, or to nothing, until the set validates.
    loop {
        let idx: Vec<usize> = (0..verdicts.len())
            .filter(|&i| verdicts[i].in_effect.is_some())
            .collect();
        let set: Vec<TenantPolicySpec> = idx
            .iter()
            .filter_map(|&i| verdicts[i].in_effect.clone())
            .collect();
        let Err(e) = validate_all(&set) else {
            return verdicts;
        };
        let Some(at) = e
            .field
            .strip_prefix("tenants[")
            .and_then(|f| f.split(']').next()?.parse::<usize>().ok())
        else {
            return verdicts;
        };
        let i = idx[at];
        let fallback = last_good
            .get(&key_of(&objs[i]))
            .filter(|g| Some(*g) != verdicts[i].in_effect.as_ref())
            .cloned();
        if verdicts[i].error.is_none() {
            verdicts[i].error = Some(e.to_string());
        }
        verdicts[i].in_effect = fallback;
    }
}

#[cfg(test)]
#[path = "watcher_tests.rs"]
mod tests;
