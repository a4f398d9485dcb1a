#!/usr/bin/env bash
# Creates the namespace, every Secret the manifests in infra/ reference, and the artifact-store ConfigMap.
# Values come from the environment or, for passwords and tokens, from `openssl rand`; none is written in
# this repository. Values pass through files in a private temp dir, not kubectl's command line, so they
# never show in `ps`.
#
#     export MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow
#     export MLFLOW_S3_ACCESS_KEY_ID=... MLFLOW_S3_SECRET_ACCESS_KEY=...
#     export MLFLOW_S3_ENDPOINT_URL=http://minio.storage.svc:9000   # only for S3-compatible stores
#     bash infra/secrets.example.sh
#
# Optional: RAY_AUTH_TOKEN to reuse a token, MLFLOW_CLIENT_USERNAME (default ray-pipeline). A Secret that
# already exists is left alone: regenerating a database password would lock MLflow out of Postgres. To
# rotate one, delete it and rerun, then update what uses it.
set -euo pipefail

# The namespace of infra/namespace.yaml, which every manifest in infra/ names.
NAMESPACE=imagenet
: "${MLFLOW_ARTIFACTS_DESTINATION:?set it to the bucket prefix for MLflow artifacts, e.g. s3://my-bucket/mlflow}"
: "${MLFLOW_S3_ACCESS_KEY_ID:?set it to the object store access key id for the MLflow server}"
: "${MLFLOW_S3_SECRET_ACCESS_KEY:?set it to the object store secret key for the MLflow server}"

umask 077
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

random_value() { openssl rand -hex 24; }  # 48 hex characters: above MLflow's 12-character minimum

# create_secret NAME KEY VALUE [KEY VALUE ...]
create_secret() {
    local name="$1"; shift
    if kubectl --namespace "$NAMESPACE" get secret "$name" >/dev/null 2>&1; then
        echo "secret/$name exists: left as is"
        return
    fi
    local dir="$workdir/$name"
    mkdir "$dir"
    while (($#)); do
        printf '%s' "$2" > "$dir/$1"
        shift 2
    done
    kubectl --namespace "$NAMESPACE" create secret generic "$name" --from-file="$dir"
}

# From its manifest, so it enforces Pod Security "restricted" before any pod can start in it.
kubectl apply --filename "$(dirname "${BASH_SOURCE[0]}")/namespace.yaml"

# Ray: one token for every node and client (RAY_AUTH_TOKEN in infra/kuberay, authOptions.secretName).
create_secret ray-auth-token auth_token "${RAY_AUTH_TOKEN:-$(random_value)}"

# Postgres: the superuser's password, read only by the postgres StatefulSet, and the password of the role
# `mlflow` the MLflow server logs in as (infra/mlflow/postgres.yaml creates the role with it). Separate
# Secrets, so the MLflow pod references only its own.
create_secret mlflow-postgres-superuser password "$(random_value)"
create_secret mlflow-postgres password "$(random_value)"
# MLflow server: bootstrap admin, CSRF key, S3 keys.
create_secret mlflow-server admin-password "$(random_value)" flask-secret-key "$(random_value)"
if [[ -n "${MLFLOW_S3_ENDPOINT_URL:-}" ]]; then
    create_secret mlflow-s3 access-key-id "$MLFLOW_S3_ACCESS_KEY_ID" \
        secret-access-key "$MLFLOW_S3_SECRET_ACCESS_KEY" endpoint-url "$MLFLOW_S3_ENDPOINT_URL"
else
    create_secret mlflow-s3 access-key-id "$MLFLOW_S3_ACCESS_KEY_ID" \
        secret-access-key "$MLFLOW_S3_SECRET_ACCESS_KEY"
fi

# What Ray pods log in to MLflow as. The user itself is created once the server runs (infra/README.md).
create_secret mlflow-client username "${MLFLOW_CLIENT_USERNAME:-ray-pipeline}" password "$(random_value)"

# Not secret, but per deployment: where --artifacts-destination points.
kubectl --namespace "$NAMESPACE" create configmap mlflow-artifacts \
    --from-literal=destination="$MLFLOW_ARTIFACTS_DESTINATION" --dry-run=client --output yaml \
    | kubectl apply --filename -
