//! The object store of the API stand-in: every object as JSON under one mutex, one global
//! revision counter (the `resourceVersion` of everything), a bounded event history that
//! watches resume from, and a broadcast channel that live watches follow.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::{
    api::admission,
    api::errors::ApiError,
    api::resources::{Registry, ResourceType},
    api::selector::{FieldSelector, LabelSelector},
};

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// A change to one object. `object` carries the new state (for DELETED: the last state
/// with the deletion's resourceVersion); `prev` the state before, for selector transitions.
#[derive(Debug)]
pub struct Event {
    pub rev: u64,
    pub kind: EventKind,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub object: Value,
    pub prev: Option<Value>,
}

/// (group, plural, namespace or "", name)
type Key = (String, String, String, String);

struct Inner {
    rev: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    /// The newest revision no longer in the history: watches from at or before it get 410.
    compacted: u64,
    /// What the stored Services hold (ClusterIPs, node ports), kept by [`Store::commit`].
    allocated: admission::Allocated,
}

pub struct Store {
    pub registry: Registry,
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
    history_limit: usize,
}

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
    /// Controllers' writes of fields clients may not change (a pod's binding to a node).
    System,
}

#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub label: LabelSelector,
    pub field: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

pub struct ListResult {
    pub items: Vec<Value>,
    pub rev: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    /// `Orphan`, `Background` or `Foreground`.
    pub propagation: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

/// What a watch selects and how it sees events (namespace, selectors, transitions).
#[derive(Clone, Debug)]
pub struct WatchFilter {
    pub group: String,
    pub plural: String,
    pub namespace: Option<String>,
    pub label: LabelSelector,
    pub field: FieldSelector,
}

pub enum WatchStart {
    /// The requested revision is older than the history: 410 Expired.
    Expired { requested: u64, oldest: u64 },
    Ready {
        initial: Vec<(EventKind, Value)>,
        rx: broadcast::Receiver<Arc<Event>>,
        rev: u64,
    },
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-4{:01x}{:02x}-{:02x}{:02x}-{}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6] & 0xf,
        b[7],
        (b[8] & 0x3f) | 0x80,
        b[9],
        b[10..]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

/// The 5-character suffix of `generateName`, from Kubernetes' alphabet.
pub fn random_suffix(n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..n)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn meta(obj: &Value, field: &str) -> String {
    obj["metadata"][field]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

impl WatchFilter {
    /// How a watcher with this filter sees `ev`: `None` if it does not concern it; a
    /// change that moves an object into or out of the selectors becomes ADDED / DELETED.
    pub fn apply(&self, ev: &Event) -> Option<(EventKind, Value)> {
        if ev.group != self.group || ev.plural != self.plural {
            return None;
        }
        if self
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != ev.namespace)
        {
            return None;
        }
        let matches = |o: &Value| self.label.matches(o) && self.field.matches(o);
        let now = matches(&ev.object);
        let before = ev.prev.as_ref().is_some_and(matches);
        match (ev.kind, before, now) {
            (EventKind::Added, _, true) => Some((EventKind::Added, ev.object.clone())),
            (EventKind::Deleted, _, true) => Some((EventKind::Deleted, ev.object.clone())),
            (EventKind::Modified, true, true) => Some((EventKind::Modified, ev.object.clone())),
            (EventKind::Modified, false, true) => Some((EventKind::Added, ev.object.clone())),
            (EventKind::Modified, true, false) => Some((EventKind::Deleted, ev.object.clone())),
            _ => None,
        }
    }
}

impl Store {
    pub fn new(history_limit: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(16_384);
        Arc::new(Self {
            registry: Registry::default(),
            inner: Mutex::new(Inner {
                rev: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                allocated: admission::Allocated::default(),
            }),
            events,
            history_limit: history_limit.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn rev(&self) -> u64 {
        self.lock().rev
    }

    /// A receiver of every change, for controllers.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    fn key(rt: &ResourceType, ns: &str, name: &str) -> Key {
        let ns = if rt.namespaced { ns } else { "" };
        (
            rt.group.clone(),
            rt.plural.clone(),
            ns.to_owned(),
            name.to_owned(),
        )
    }

    /// Sets the requested version's apiVersion/kind (CRDs may serve several versions of one
    /// stored object).
    fn present(rt: &ResourceType, mut obj: Value) -> Value {
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        obj
    }

    fn commit(
        &self,
        inner: &mut Inner,
        kind: EventKind,
        key: &Key,
        object: Value,
        prev: Option<Value>,
    ) -> Value {
        inner.rev += 1;
        let rev = inner.rev;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(rev.to_string());
        // A changed definition serves its versions and schema as changed (a created one is
        // registered by `create`, which refuses an invalid one).
        if key.0 == "apiextensions.k8s.io"
            && key.1 == "customresourcedefinitions"
            && kind == EventKind::Modified
            && let Err(error) = self.registry.add_crd(&object)
        {
            eprintln!(
                "kt-testbed api: a changed CustomResourceDefinition is not served as changed: {error}"
            );
        }
        if key.0.is_empty() && key.1 == "services" {
            if let Some(stored) = inner.objects.get(key) {
                inner.allocated.remove(stored);
            }
            if kind != EventKind::Deleted {
                inner.allocated.add(&object);
            }
        }
        match kind {
            EventKind::Deleted => {
                inner.objects.remove(key);
            }
            _ => {
                inner.objects.insert(key.clone(), object.clone());
            }
        }
        let ev = Arc::new(Event {
            rev,
            kind,
            group: key.0.clone(),
            plural: key.1.clone(),
            namespace: key.2.clone(),
            object: object.clone(),
            prev,
        });
        inner.history.push_back(ev.clone());
        while inner.history.len() > self.history_limit {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rev;
            }
        }
        let _ = self.events.send(ev);
        object
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Value> {
        let inner = self.lock();
        inner
            .objects
            .get(&Self::key(rt, ns, name))
            .map(|o| Self::present(rt, o.clone()))
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Every stored object of a type, in all namespaces (for controllers; no copies of the
    /// apiVersion rewriting).
    pub fn all(&self, group: &str, plural: &str) -> Vec<Value> {
        self.all_as(group, plural, Value::clone)
    }

    /// `view` of every stored object of a type, in key order, computed under the store's
    /// lock: for a controller that needs a few fields of every object, without copying each
    /// whole object as [`Store::all`] does (the garbage collector reads every type).
    pub fn all_as<T>(&self, group: &str, plural: &str, view: impl FnMut(&Value) -> T) -> Vec<T> {
        let inner = self.lock();
        let start: Key = (group.into(), plural.into(), String::new(), String::new());
        inner
            .objects
            .range(start..)
            .take_while(|(k, _)| k.0 == group && k.1 == plural)
            .map(|(_, v)| v)
            .map(view)
            .collect()
    }

    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, q: &ListQuery) -> Result<ListResult> {
        let inner = self.lock();
        let (snapshot_rev, after) = match &q.continue_token {
            Some(token) => {
                let (rev, after) = decode_continue(token)
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                if rev <= inner.compacted {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.".into(),
                    ));
                }
                (rev, Some(after))
            }
            None => (inner.rev, None),
        };
        let ns_key = if rt.namespaced {
            ns.unwrap_or_default()
        } else {
            ""
        };
        let start: Key = (
            rt.group.clone(),
            rt.plural.clone(),
            ns_key.to_owned(),
            String::new(),
        );
        let mut items = Vec::new();
        let mut last_key = None;
        let mut remaining = 0usize;
        for (key, obj) in inner.objects.range(start..) {
            if key.0 != rt.group || key.1 != rt.plural {
                break;
            }
            if rt.namespaced && ns.is_some() && key.2 != ns_key {
                break;
            }
            let flat = format!("{}/{}", key.2, key.3);
            if after.as_ref().is_some_and(|a| flat <= *a) {
                continue;
            }
            if !(q.label.matches(obj) && q.field.matches(obj)) {
                continue;
            }
            if q.limit.is_some_and(|l| l > 0 && items.len() >= l) {
                remaining += 1;
                continue;
            }
            last_key = Some(flat);
            items.push(Self::present(rt, obj.clone()));
        }
        let continue_token = (remaining > 0)
            .then(|| encode_continue(snapshot_rev, last_key.as_deref().unwrap_or("")));
        Ok(ListResult {
            items,
            rev: snapshot_rev,
            continue_token,
            remaining: (remaining > 0).then_some(remaining),
        })
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was not an object",
            ));
        }
        let mut inner = self.lock();
        if rt.namespaced {
            let body_ns = meta(&obj, "namespace");
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            let ns_key: Key = (String::new(), "namespaces".into(), String::new(), ns.into());
            match inner.objects.get(&ns_key) {
                None => return Err(ApiError::namespace_not_found(ns)),
                Some(n) if n["metadata"].get("deletionTimestamp").is_some() => {
                    let mut e =
                        ApiError::forbidden("", "create", &rt.plural, &rt.group, Some(ns), None);
                    e.message = format!(
                        "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        rt.qualified(),
                        meta(&obj, "name")
                    );
                    return Err(e);
                }
                Some(_) => {}
            }
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        let mut name = meta(&obj, "name");
        if name.is_empty() {
            let prefix = meta(&obj, "generateName");
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    &[(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
            let prefix: String = prefix.chars().take(58).collect();
            loop {
                name = format!("{prefix}{}", random_suffix(5));
                if !inner.objects.contains_key(&Self::key(rt, ns, &name)) {
                    break;
                }
            }
            obj["metadata"]["name"] = json!(name);
        }
        let mut causes: admission::Causes = Vec::new();
        if let Some(msg) = admission::validate_name(rt, &name) {
            causes.push(("metadata.name".into(), msg));
        }
        causes.extend(admission::validate_labels(&obj));
        let key = Self::key(rt, ns, &name);
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        // Before defaulting: a Job's generated selector is made of its uid.
        let uid = new_uid();
        obj["metadata"]["uid"] = json!(uid);
        causes.extend(admission::default_on_create(rt, &mut obj, &inner.allocated));
        if rt.group == "apiextensions.k8s.io"
            && rt.plural == "customresourcedefinitions"
            && let Err(msg) = crate::api::resources::crd_types(&obj)
        {
            let (field, text) = msg.split_once(": ").unwrap_or(("spec", &msg));
            causes.push((field.to_owned(), text.to_owned()));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(rt, &name, &causes));
        }
        let m = obj["metadata"]
            .as_object_mut()
            .expect("checked to be an object");
        for field in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
        ] {
            m.remove(field);
        }
        m.insert("uid".into(), json!(uid));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        if obj.get("spec").is_some() {
            obj["metadata"]["generation"] = json!(1);
        }
        let obj = Self::present(rt, obj);
        if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
            return self.create_crd(&mut inner, rt, &key, obj, dry_run);
        }
        if dry_run {
            return Ok(obj);
        }
        Ok(self.commit(&mut inner, EventKind::Added, &key, obj, None))
    }

    fn create_crd(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        key: &Key,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value> {
        let names = obj["spec"]["names"].clone();
        let mut accepted = names.clone();
        if accepted.get("singular").is_none() {
            accepted["singular"] = json!(names["kind"].as_str().unwrap_or_default().to_lowercase());
        }
        if accepted.get("listKind").is_none() {
            accepted["listKind"] = json!(format!(
                "{}List",
                names["kind"].as_str().unwrap_or_default()
            ));
        }
        let now = now_rfc3339();
        obj["status"] = json!({
            "acceptedNames": accepted,
            "storedVersions": obj["spec"]["versions"].as_array().into_iter().flatten()
                .filter(|v| v["storage"].as_bool() == Some(true)).map(|v| v["name"].clone()).collect::<Vec<_>>(),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
            ],
        });
        if dry_run {
            return Ok(obj);
        }
        self.registry
            .add_crd(&obj)
            .map_err(|m| ApiError::invalid(rt, &key.3, &[("spec".into(), m)]))?;
        Ok(self.commit(inner, EventKind::Added, key, obj, None))
    }

    /// PUT of the main resource or of `status`.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        new: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value> {
        let mut inner = self.lock();
        self.update_locked(&mut inner, rt, ns, name, new, part, dry_run)
    }

    /// Read-modify-write under the lock (PATCH, scale, controllers). `f` gets the current
    /// object and returns the new one; the result goes through the same checks as a PUT,
    /// with an unconditional resourceVersion unless `f` leaves a different one.
    pub fn modify(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        part: Part,
        dry_run: bool,
        f: impl FnOnce(Value) -> Result<Value>,
    ) -> Result<Value> {
        let mut inner = self.lock();
        let key = Self::key(rt, ns, name);
        let current = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        let current = Self::present(rt, current);
        let current_rv = meta(&current, "resourceVersion");
        let mut new = f(current)?;
        if new["metadata"]["resourceVersion"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            new["metadata"]["resourceVersion"] = json!(current_rv);
        }
        self.update_locked(&mut inner, rt, ns, name, new, part, dry_run)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one private write path shared by PUT and PATCH"
    )]
    fn update_locked(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        mut new: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value> {
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was not an object",
            ));
        }
        let key = Self::key(rt, ns, name);
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        let body_name = meta(&new, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let rv = meta(&new, "resourceVersion");
        if !rv.is_empty() && rv != meta(&old, "resourceVersion") {
            return Err(ApiError::conflict(rt, name));
        }
        // The status/spec split: each endpoint writes only its half.
        match part {
            Part::Status => {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        new.as_object_mut().map(|m| m.remove("status"));
                    }
                }
            }
            Part::Main if rt.status => match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().map(|m| m.remove("status"));
                }
            },
            Part::Main | Part::System => {}
        }
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
            "name",
            "generation",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    new["metadata"].as_object_mut().map(|m| m.remove(field));
                }
            }
        }
        new["metadata"]
            .as_object_mut()
            .map(|m| m.remove("managedFields"));
        let terminating = old["metadata"].get("deletionTimestamp").is_some();
        if terminating {
            let before: HashSet<&str> = finalizers(&old).into_iter().collect();
            if finalizers(&new).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    &[(
                        "metadata.finalizers".into(),
                        "Forbidden: no new finalizers can be added if the object is being deleted"
                            .into(),
                    )],
                ));
            }
        }
        let mut causes = admission::validate_labels(&new);
        if part == Part::Main {
            causes.extend(admission::immutable_changes(rt, &old, &new));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(rt, name, &causes));
        }
        if part == Part::Main && old.get("spec") != new.get("spec") && new.get("spec").is_some() {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0);
            new["metadata"]["generation"] = json!(generation + 1);
        }
        let mut new = Self::present(rt, new);
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == Self::present(rt, old.clone()) {
            // A no-op write keeps the resourceVersion and sends no event.
            return Ok(new);
        }
        if dry_run {
            return Ok(new);
        }
        if terminating && finalizers(&new).is_empty() && !self.waits_for_kubelet(rt, &new) {
            return Ok(self.commit(inner, EventKind::Deleted, &key, new, Some(old)));
        }
        Ok(self.commit(inner, EventKind::Modified, &key, new, Some(old)))
    }

    /// Pods bound to a node are removed by their kubelet (a delete with grace 0), not when
    /// their finalizers are gone.
    fn waits_for_kubelet(&self, rt: &ResourceType, obj: &Value) -> bool {
        rt.group.is_empty()
            && rt.plural == "pods"
            && obj["spec"]["nodeName"].is_string()
            && obj["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                > 0
    }

    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value> {
        let mut inner = self.lock();
        let key = Self::key(rt, ns, name);
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        for (what, wanted, field) in [
            ("UID", &opts.precondition_uid, "uid"),
            ("ResourceVersion", &opts.precondition_rv, "resourceVersion"),
        ] {
            if let Some(wanted) = wanted.as_ref().filter(|w| **w != meta(&old, field)) {
                let mut e = ApiError::conflict(rt, name);
                e.message = format!(
                    "Precondition failed: {what} in precondition: {wanted}, {what} in object meta: {}",
                    meta(&old, field)
                );
                return Err(e);
            }
        }
        let mut obj = old.clone();
        let now = chrono::Utc::now();
        let is_pod = rt.group.is_empty() && rt.plural == "pods";
        let grace = if is_pod && obj["spec"]["nodeName"].is_string() {
            opts.grace_period_seconds
                .or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30)
                .max(0)
        } else {
            0
        };
        let already = obj["metadata"].get("deletionTimestamp").is_some();
        let mut fins = finalizers(&obj)
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        match opts.propagation.as_deref() {
            Some("Foreground") if !already => fins.push("foregroundDeletion".into()),
            Some("Orphan") if !already => fins.push("orphan".into()),
            _ => {}
        }
        if rt.group.is_empty() && rt.plural == "namespaces" {
            if !already {
                obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                obj["status"]["phase"] = json!("Terminating");
                return Ok(self.finish_delete(
                    &mut inner,
                    rt,
                    &key,
                    obj,
                    old,
                    EventKind::Modified,
                    opts.dry_run,
                ));
            }
            return Ok(Self::present(rt, obj));
        }
        if grace > 0 || !fins.is_empty() {
            let current_grace = obj["metadata"]["deletionGracePeriodSeconds"].as_i64();
            // A second delete may only shorten the grace period (what `--force` relies on).
            if already && current_grace.is_some_and(|g| g <= grace) && fins == finalizers(&obj) {
                return Ok(Self::present(rt, obj));
            }
            if grace > 0 || !already {
                let at = now + chrono::Duration::seconds(grace);
                obj["metadata"]["deletionTimestamp"] =
                    json!(at.format("%Y-%m-%dT%H:%M:%SZ").to_string());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            }
            obj["metadata"]["finalizers"] = json!(fins);
            if fins.is_empty() {
                obj["metadata"]
                    .as_object_mut()
                    .map(|m| m.remove("finalizers"));
            }
            return Ok(self.finish_delete(
                &mut inner,
                rt,
                &key,
                obj,
                old,
                EventKind::Modified,
                opts.dry_run,
            ));
        }
        if rt.group == "apiextensions.k8s.io"
            && rt.plural == "customresourcedefinitions"
            && !opts.dry_run
        {
            self.registry.remove_crd(&obj);
        }
        Ok(self.finish_delete(
            &mut inner,
            rt,
            &key,
            obj,
            old,
            EventKind::Deleted,
            opts.dry_run,
        ))
    }

    /// The end of a delete: a dry run returns what would be, anything else commits `kind`
    /// (MODIFIED for a deletion that waits, DELETED for one that is done).
    #[expect(
        clippy::too_many_arguments,
        reason = "the state of one delete, handed over once"
    )]
    fn finish_delete(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        key: &Key,
        obj: Value,
        old: Value,
        kind: EventKind,
        dry_run: bool,
    ) -> Value {
        if dry_run {
            return Self::present(rt, obj);
        }
        self.commit(inner, kind, key, Self::present(rt, obj), Some(old))
    }

    /// Removes an object at once, whatever its finalizers (namespace finalisation, a
    /// kubelet's final delete of a pod).
    pub fn purge(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Value> {
        let mut inner = self.lock();
        let key = Self::key(rt, ns, name);
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        Ok(self.commit(
            &mut inner,
            EventKind::Deleted,
            &key,
            Self::present(rt, old.clone()),
            Some(old),
        ))
    }

    /// Starts a watch: the initial events (all current matches as ADDED when `from` is
    /// unset or 0, else the history after `from`) and a receiver for what follows. The
    /// receiver is subscribed under the lock, so nothing falls between the two.
    pub fn watch(&self, rt: &ResourceType, filter: &WatchFilter, from: Option<u64>) -> WatchStart {
        let inner = self.lock();
        let rx = self.events.subscribe();
        let initial = match from {
            None | Some(0) => {
                let q = ListQuery {
                    label: filter.label.clone(),
                    field: filter.field.clone(),
                    ..Default::default()
                };
                drop(inner);
                // Re-take the lock inside list; the receiver above already queues any change.
                let list = match self.list(rt, filter.namespace.as_deref(), &q) {
                    Ok(l) => l,
                    Err(_) => {
                        return WatchStart::Ready {
                            initial: vec![],
                            rx,
                            rev: self.rev(),
                        };
                    }
                };
                let rev = list.rev;
                let initial = list
                    .items
                    .into_iter()
                    .map(|o| (EventKind::Added, o))
                    .collect();
                return WatchStart::Ready { initial, rx, rev };
            }
            Some(n) if n < inner.compacted => {
                return WatchStart::Expired {
                    requested: n,
                    oldest: inner.compacted + 1,
                };
            }
            Some(n) => inner
                .history
                .iter()
                .filter(|e| e.rev > n)
                .filter_map(|e| filter.apply(e))
                .map(|(k, o)| (k, Self::present(rt, o)))
                .collect(),
        };
        WatchStart::Ready {
            initial,
            rx,
            rev: inner.rev,
        }
    }
}

pub fn finalizers(obj: &Value) -> Vec<&str> {
    obj["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn encode_continue(rev: u64, after: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(json!({"rv": rev, "start": after}).to_string())
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    Some((v["rv"].as_u64()?, v["start"].as_str()?.to_owned()))
}
