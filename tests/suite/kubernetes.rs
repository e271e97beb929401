//! The Kubernetes deployment (`deploy/kubernetes`), rendered by `kubectl
//! kustomize` as `kubectl apply -k` would, and held to what sendgate is:
//! the settings it ships are valid, the probes and ports are the ones it
//! serves, the drain fits in the grace period, secrets are referenced, the
//! pods run unprivileged, and the objects of KEDA and the Prometheus
//! Operator (which no offline schema covers) point at what they must: the
//! autoscaler at the queues sendgate gates, the ServiceMonitor at its
//! Service, the PrometheusRule equal to `config/prometheus/alerts.yml`.
//! CI also validates the native objects against the API schemas
//! (kubernetes-validate, in `.ci/run`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use yaml_serde::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "deploy/kubernetes/base/prometheusrule.yaml";

/// The objects `kubectl kustomize DIR` renders, by kind and name.
fn render(dir: &str) -> BTreeMap<(String, String), Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", &format!("{ROOT}/{dir}")])
        .output()
        .expect("kubectl runs (CI installs it; README: Running on Kubernetes)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    yaml_serde::Deserializer::from_str(&text)
        .map(|doc| {
            let object = Value::deserialize(doc).unwrap();
            let key = (
                text_of(&object["kind"]).to_owned(),
                text_of(&object["metadata"]["name"]).to_owned(),
            );
            (key, object)
        })
        .collect()
}

fn text_of(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("a string: {value:?}"))
}

fn number(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("a number: {value:?}"))
}

/// The one object of `kind` (its name starts with `name`: generated
/// ConfigMaps carry a hash).
fn one<'a>(objects: &'a BTreeMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|((k, n), _)| k == kind && n.starts_with(name))
        .map(|(_, object)| object)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name}: {:?}", objects.keys());
    found[0]
}

/// The settings the pods run with: the defaults under the shipped file.
fn shipped_settings(objects: &BTreeMap<(String, String), Value>) -> sendgate::config::Settings {
    let config = one(objects, "ConfigMap", "sendgate-config");
    let file = tempfile_with(text_of(&config["data"]["sendgate.toml"]));
    sendgate::config::Settings::load_from(Some(&file), Vec::new())
        .expect("the shipped sendgate.toml is valid")
}

fn tempfile_with(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "sendgate-k8s-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

fn have_kubectl() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !found && std::env::var_os("CI").is_some() {
        panic!("kubectl is missing: CI renders the Kubernetes manifests with it");
    }
    found
}

#[test]
fn the_deployment_runs_what_sendgate_serves_unprivileged_and_drains_in_time() {
    if !have_kubectl() {
        return;
    }
    let objects = render("deploy/kubernetes/base");
    let settings = shipped_settings(&objects);
    assert!(
        !settings.database.migrate_on_start,
        "the Job migrates, as the owner"
    );

    let deployment = one(&objects, "Deployment", "sendgate");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "run");
    // The port sendgate listens on, and the paths it answers.
    let port = number(&container["ports"][0]["containerPort"]);
    assert_eq!(port, u64::from(settings.http.listen.port()));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // The drain ends before the kubelet's SIGKILL.
    let grace = number(&pod["terminationGracePeriodSeconds"]);
    assert!(
        grace > settings.shutdown.grace_period_secs + 10,
        "terminationGracePeriodSeconds {grace} vs [shutdown] grace_period_secs {}",
        settings.shutdown.grace_period_secs
    );
    // The config file is where the pod mounts it.
    let config_path = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SENDGATE_CONFIG")
        .map(|e| text_of(&e["value"]).to_owned())
        .unwrap();
    let mount = text_of(&container["volumeMounts"][0]["mountPath"]);
    assert_eq!(Path::new(&config_path).parent(), Some(Path::new(mount)));

    // Secrets by reference: no connection string or token is written here.
    for (object, container) in [
        (deployment, container),
        (
            one(&objects, "Job", "sendgate-migrate"),
            &one(&objects, "Job", "sendgate-migrate")["spec"]["template"]["spec"]["containers"][0],
        ),
    ] {
        for env in container["env"].as_sequence().unwrap() {
            let name = text_of(&env["name"]);
            if ["DATABASE_URL", "AMQP_URL", "SENDGATE__API__TOKEN"].contains(&name) {
                assert!(
                    env["value"].is_null() && !env["valueFrom"]["secretKeyRef"].is_null(),
                    "{name} of {} comes from a Secret",
                    text_of(&object["metadata"]["name"])
                );
            }
        }
        // Unprivileged, read-only, as the image's user (Dockerfile: USER 10001).
        let spec = &object["spec"]["template"]["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(spec["securityContext"]["runAsUser"], 10001);
        assert_eq!(spec["automountServiceAccountToken"], false);
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"][0], "ALL");
    }
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    assert!(dockerfile.contains("USER 10001"));
    let migrate = one(&objects, "Job", "sendgate-migrate");
    assert_eq!(
        migrate["spec"]["template"]["spec"]["containers"][0]["args"][0],
        "migrate"
    );

    // The disruption budget and the Service select the Deployment's pods.
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (kind, selector) in [
        (
            "PodDisruptionBudget",
            &one(&objects, "PodDisruptionBudget", "sendgate")["spec"]["selector"]["matchLabels"],
        ),
        (
            "Service",
            &one(&objects, "Service", "sendgate")["spec"]["selector"],
        ),
    ] {
        let selector = selector.as_mapping().unwrap();
        assert!(!selector.is_empty(), "{kind} selects something");
        for (key, value) in selector {
            assert_eq!(
                &pod_labels[key], value,
                "{kind} selects the pods by {key:?}"
            );
        }
        // ... and not the migrate Job's pod, which serves nothing.
        let job_labels = &migrate["spec"]["template"]["metadata"]["labels"];
        assert!(
            selector
                .iter()
                .any(|(key, value)| &job_labels[key] != value),
            "{kind} selects the migrate Job's pod too"
        );
    }
}

#[test]
fn the_autoscaler_and_the_monitoring_objects_point_at_what_sendgate_is() {
    if !have_kubectl() {
        return;
    }
    let objects = render("deploy/kubernetes/base");
    let settings = shipped_settings(&objects);

    // KEDA scales the Deployment on the depth of exactly the job queues.
    let scaled = one(&objects, "ScaledObject", "sendgate");
    assert_eq!(scaled["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "sendgate");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(trigger["metadata"]["useRegex"], "true");
    assert_eq!(trigger["metadata"]["operation"], "sum");
    assert_eq!(trigger["metadata"]["protocol"], "http");
    let pattern = regex::Regex::new(text_of(&trigger["metadata"]["queueName"])).unwrap();
    let job_queues = settings.amqp.job_queues();
    assert_eq!(job_queues.len(), 1 + settings.amqp.partitions as usize);
    for queue in &job_queues {
        assert!(pattern.is_match(queue), "{queue} is counted");
    }
    let amqp = &settings.amqp;
    let mut others = vec![
        amqp.delivery_queue.clone(),
        amqp.dead_letter_queue.clone(),
        amqp.outcomes_queue.clone(),
        amqp.events_queue.clone(),
        amqp.wait_queue.clone(),
        format!("{}.p", amqp.wait_queue),
    ];
    others.extend(amqp.partition_ladder().into_iter().map(|(_, q)| q));
    for queue in &others {
        assert!(!pattern.is_match(queue), "{queue} is not a job queue");
    }
    let auth = one(&objects, "TriggerAuthentication", "sendgate-rabbitmq");
    assert_eq!(
        trigger["authenticationRef"]["name"],
        auth["metadata"]["name"]
    );
    // Within the database's connections: each replica holds its pool and
    // the marks connection; Postgres allows 100 by default.
    let (min, max) = (
        number(&scaled["spec"]["minReplicaCount"]),
        number(&scaled["spec"]["maxReplicaCount"]),
    );
    assert!(2 <= min && min <= max, "{min}..{max}");
    assert!(max * (u64::from(settings.database.max_connections) + 1) <= 100);

    // The ServiceMonitor scrapes the Service's port at /metrics.
    let monitor = one(&objects, "ServiceMonitor", "sendgate");
    let service = one(&objects, "Service", "sendgate");
    let port = &monitor["spec"]["endpoints"][0]["port"];
    assert!(
        service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| &p["name"] == port),
        "the Service has a port named {port:?}"
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(&service["metadata"]["labels"][key], value);
    }

    // The PrometheusRule holds the alert rules of alerts.yml, as they are.
    let alerts: Value = yaml_serde::from_str(
        &std::fs::read_to_string(format!("{ROOT}/config/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let rule = one(&objects, "PrometheusRule", "sendgate");
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "{RULES} is behind config/prometheus/alerts.yml: UPDATE_DOCS=1 cargo test --test suite kubernetes"
    );
}

#[test]
fn the_ha_overlay_spreads_three_pods_and_keeps_two_through_a_disruption() {
    if !have_kubectl() {
        return;
    }
    let objects = render("deploy/kubernetes/overlays/ha");
    let deployment = one(&objects, "Deployment", "sendgate");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        .as_sequence()
        .unwrap();
    let keys: Vec<&str> = spread.iter().map(|c| text_of(&c["topologyKey"])).collect();
    assert_eq!(
        keys,
        ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
    assert_eq!(
        one(&objects, "PodDisruptionBudget", "sendgate")["spec"]["minAvailable"],
        2
    );
    assert_eq!(
        one(&objects, "ScaledObject", "sendgate")["spec"]["minReplicaCount"],
        3
    );
}

/// `deploy/kubernetes/base/prometheusrule.yaml` is generated from
/// `config/prometheus/alerts.yml`; `UPDATE_DOCS=1` writes it.
#[test]
fn the_prometheus_rule_is_generated_from_the_alert_rules() {
    let alerts: Value = yaml_serde::from_str(
        &std::fs::read_to_string(format!("{ROOT}/config/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let mut rule = yaml_serde::Mapping::new();
    rule.insert("apiVersion".into(), "monitoring.coreos.com/v1".into());
    rule.insert("kind".into(), "PrometheusRule".into());
    let mut metadata = yaml_serde::Mapping::new();
    metadata.insert("name".into(), "sendgate".into());
    rule.insert("metadata".into(), Value::Mapping(metadata));
    let mut spec = yaml_serde::Mapping::new();
    spec.insert("groups".into(), alerts["groups"].clone());
    rule.insert("spec".into(), Value::Mapping(spec));
    let generated = format!(
        "# Generated from config/prometheus/alerts.yml by tests/suite/kubernetes.rs\n\
         # (UPDATE_DOCS=1 cargo test --test suite kubernetes); do not edit.\n{}",
        yaml_serde::to_string(&Value::Mapping(rule)).unwrap()
    );
    let path = format!("{ROOT}/{RULES}");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{RULES} is behind config/prometheus/alerts.yml: UPDATE_DOCS=1 cargo test --test suite kubernetes"
    );
}
