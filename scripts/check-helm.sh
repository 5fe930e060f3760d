#!/usr/bin/env bash
# Checks the Helm chart, helm/switchyard, without a cluster:
#
#   1. `helm lint --strict` with the chart's defaults and with each scenario
#      in helm/switchyard/ci/ (values.schema.json included);
#   2. `helm template` of each scenario into a temporary directory, and
#      `kubernetes-validate --strict` of every rendered manifest against the
#      Kubernetes versions below (unknown fields are errors). Custom
#      resources have no schema there: the kinds in crd_kinds are skipped by
#      name, and any other kind without a schema fails the check;
#   3. `yamllint --strict` (.yamllint.yaml) of Chart.yaml, values.yaml, the
#      scenarios and the rendered manifests (not the raw templates, which are
#      Go templates);
#   4. what the chart must refuse is refused, with its message, and the
#      computed terminationGracePeriodSeconds is what the README says.
#
# Needs helm, kubernetes-validate and yamllint on PATH:
#   eval "$(bash scripts/install-test-tools.sh)" && bash scripts/check-helm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

chart=helm/switchyard
# Rendered as the oldest Kubernetes the chart supports (Chart.yaml's
# kubeVersion: the preStop sleep action), validated against it and the
# newest kubernetes-validate knows.
render_version=1.30.0
validate_versions=(1.30.0 1.37.0)
# Custom resources: kubernetes-validate has no schema for them (it warns and
# passes), so they are named here and skipped.
crd_kinds=(ServiceMonitor)

for tool in helm kubernetes-validate yamllint; do
  command -v "$tool" >/dev/null || {
    echo "check-helm: $tool is not on PATH; run: eval \"\$(bash scripts/install-test-tools.sh)\"" >&2
    exit 1
  }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "check-helm: FAILED: $*" >&2; exit 1; }

scenarios=("$chart"/ci/*-values.yaml)
[[ ${#scenarios[@]} -ge 3 ]] || fail "expected the scenarios in $chart/ci/"

echo "-- helm lint --strict"
if ! helm lint --strict "$chart" >"$work/lint.log" 2>&1; then
  cat "$work/lint.log" >&2; fail "helm lint (defaults)"
fi
for values in "${scenarios[@]}"; do
  if ! helm lint --strict "$chart" -f "$values" >"$work/lint.log" 2>&1; then
    cat "$work/lint.log" >&2; fail "helm lint -f $values"
  fi
  echo "lint ok: $values"
done

# Renders a scenario into $work/<name>/, one file per manifest.
render() {
  local values="$1" name="$2" raw="$work/$2.raw" docs="$work/$2"
  helm template switchyard "$chart" --namespace switchyard \
    --kube-version "$render_version" -f "$values" --output-dir "$raw" >/dev/null \
    || fail "helm template -f $values"
  mkdir -p "$docs"
  local f
  while IFS= read -r f; do
    # A template file may hold several documents: split on `---`.
    awk -v dir="$docs" -v base="$(basename "$f" .yaml)" '
      /^---$/ { n++; next }
      { out = sprintf("%s/%s-%d.yaml", dir, base, n); print > out }
    ' "$f"
  done < <(find "$raw" -type f -name '*.yaml' | sort)
  # Drop documents that rendered empty (comments only).
  for f in "$docs"/*.yaml; do
    grep -q '^kind:' "$f" || rm -f "$f"
  done
}

echo "-- helm template, kubernetes-validate --strict, yamllint"
rendered=()
for values in "${scenarios[@]}"; do
  name="$(basename "$values" -values.yaml)"
  render "$values" "$name"
  to_validate=()
  for doc in "$work/$name"/*.yaml; do
    kind="$(awk '/^kind:/ { print $2; exit }' "$doc")"
    if [[ " ${crd_kinds[*]} " == *" $kind "* ]]; then
      echo "$name: skipped $kind (a custom resource; kubernetes-validate has no schema for it)"
    else
      to_validate+=("$doc")
    fi
    rendered+=("$doc")
  done
  for version in "${validate_versions[@]}"; do
    if ! kubernetes-validate --strict --quiet -k "$version" "${to_validate[@]}" >"$work/kv.log" 2>&1 \
       || grep -q "Couldn't find schema" "$work/kv.log"; then
      cat "$work/kv.log" >&2
      fail "kubernetes-validate ($name, Kubernetes $version)"
    fi
  done
  kinds="$(for d in "${to_validate[@]}"; do awk '/^kind:/ { print $2; exit }' "$d"; done | sort | paste -sd, -)"
  echo "$name: ${#to_validate[@]} manifests valid against Kubernetes ${validate_versions[*]}: $kinds"
done

yamllint --strict -c .yamllint.yaml \
  "$chart/Chart.yaml" "$chart/values.yaml" "${scenarios[@]}" "${rendered[@]}" \
  || fail "yamllint"
echo "yamllint ok: Chart.yaml, values.yaml, ${#scenarios[@]} scenarios, ${#rendered[@]} rendered manifests"

echo "-- refusals and computed values"
# helm template must fail, saying $1.
must_fail() {
  local want="$1"; shift
  if helm template switchyard "$chart" --kube-version "$render_version" "$@" >"$work/out.log" 2>&1; then
    fail "helm template $* rendered; it must be refused ($want)"
  fi
  grep -qF -- "$want" "$work/out.log" || { cat "$work/out.log" >&2; fail "helm template $*: not refused with \"$want\""; }
  echo "refused as it must be: $*"
}
must_fail "autoscaling.enabled needs database.mode=postgres" --set autoscaling.enabled=true
must_fail "runs exactly one replica" --set replicaCount=2
must_fail "needs database.postgres.existingSecret" --set database.mode=postgres
must_fail "metrics.serviceMonitor.enabled needs metrics.enabled" --set metrics.serviceMonitor.enabled=true
must_fail "extraEnv may not set SWITCHYARD_SHUTDOWN_GRACE_SECONDS" \
  --set 'extraEnv[0].name=SWITCHYARD_SHUTDOWN_GRACE_SECONDS' --set-string 'extraEnv[0].value=60'
must_fail "values don't meet the specifications of the schema" --set replicaCount=three
must_fail "Additional property" --set unknownTopLevel=1
must_fail "autoscaling.minReplicas may not exceed autoscaling.maxReplicas" \
  -f "$chart/ci/postgres-values.yaml" --set autoscaling.enabled=true \
  --set autoscaling.minReplicas=5 --set autoscaling.maxReplicas=2
must_fail "podLabels may not set app.kubernetes.io/component" \
  --set 'podLabels.app\.kubernetes\.io/component=x'
must_fail "successThreshold" --set probes.liveness.successThreshold=3

# terminationGracePeriodSeconds = preStop sleep + 3 x grace + margin.
grace_of() {
  helm template switchyard "$chart" --kube-version "$render_version" --show-only templates/deployment.yaml "$@" \
    | awk '/terminationGracePeriodSeconds:/ { print $2 }'
}
[[ "$(grace_of)" == 40 ]] || fail "defaults: terminationGracePeriodSeconds $(grace_of), want 5 + 3 x 10 + 5 = 40"
got="$(grace_of -f "$chart/ci/everything-on-values.yaml")"
[[ "$got" == 80 ]] || fail "everything-on: terminationGracePeriodSeconds $got, want 10 + 3 x 20 + 10 = 80"
echo "terminationGracePeriodSeconds: 40 (defaults), 80 (everything-on)"

# PostgreSQL: each replica's pool keeps the most pods that run at once
# (replicas, a rolling update's 25 % surge, and as many terminating)
# within connectionBudget.
pool_of() {
  helm template switchyard "$chart" --kube-version "$render_version" --show-only templates/deployment.yaml \
    -f "$chart/ci/postgres-values.yaml" "$@" \
    | awk '/name: SWITCHYARD_DATABASE_MAX_CONNECTIONS/ { getline; gsub(/"/, "", $2); print $2 }'
}
[[ "$(pool_of)" == 16 ]] || fail "3 replicas: pool $(pool_of), want 16 (the server's default; 5 pods x 17 <= 90)"
got="$(pool_of --set autoscaling.enabled=true)"
[[ "$got" == 8 ]] || fail "maxReplicas 6: pool $got, want 90 / (6 + 2 + 2) - 1 = 8"
got="$(pool_of --set autoscaling.enabled=true --set database.postgres.connectionBudget=400)"
[[ "$got" == 16 ]] || fail "maxReplicas 6, budget 400: pool $got, want 16 (at most the server's default)"
got="$(pool_of --set database.postgres.poolSize=14)"
[[ "$got" == 14 ]] || fail "poolSize 14: pool $got, want 14"
sqlite_env="$(helm template switchyard "$chart" --kube-version "$render_version" --show-only templates/deployment.yaml)"
[[ "$sqlite_env" != *SWITCHYARD_DATABASE_MAX_CONNECTIONS* ]] || fail "sqlite mode sets a PostgreSQL pool"
echo "PostgreSQL pool: 16 (3 replicas), 8 (maxReplicas 6), 16 (budget 400), 14 (poolSize 14), none on SQLite"
must_fail "a pool of at least 4 connections" -f "$chart/ci/postgres-values.yaml" \
  --set autoscaling.enabled=true --set autoscaling.maxReplicas=30
must_fail "over database.postgres.connectionBudget 90" -f "$chart/ci/postgres-values.yaml" \
  --set database.postgres.poolSize=30
must_fail "the server needs at least 4" -f "$chart/ci/postgres-values.yaml" \
  --set database.postgres.poolSize=3
must_fail "extraEnv may not set SWITCHYARD_DATABASE_MAX_CONNECTIONS" -f "$chart/ci/postgres-values.yaml" \
  --set 'extraEnv[0].name=SWITCHYARD_DATABASE_MAX_CONNECTIONS' --set-string 'extraEnv[0].value=60'

echo "check-helm: ok"
