#!/usr/bin/env bash
# Writes the MLflow address and credentials that every node of aws-gpu.yaml sources before `ray start`
# (file_mounts copies the file there). Each value is quoted for the shell with printf %q, so a password
# holding $, `, ', ; or a newline is read back as itself and never runs as a command on the nodes.
#
#     read -rs MLFLOW_TRACKING_PASSWORD && export MLFLOW_TRACKING_PASSWORD    # kept out of shell history
#     MLFLOW_TRACKING_URI=https://mlflow.example.com MLFLOW_TRACKING_USERNAME=ray-pipeline \
#         bash infra/cluster-launcher/write-mlflow-env.sh      # [target, default the path file_mounts reads]
#
# %q quotes for bash; the nodes' start commands run in bash.
set -euo pipefail

: "${MLFLOW_TRACKING_URI:?set it to the MLflow server the cluster logs to}"
: "${MLFLOW_TRACKING_USERNAME:?set it to the MLflow user the cluster logs in as}"
: "${MLFLOW_TRACKING_PASSWORD:?set it to the password of that user}"
target="${1:-$HOME/.config/imagenet-pipeline/mlflow.env}"

umask 077  # credentials: readable by this user only, the directory included
mkdir -p "$(dirname "$target")"
# Written beside the target and renamed over it, so a node never copies a half-written file.
staging="$(mktemp "$target.XXXXXX")"
trap 'rm -f "$staging"' EXIT
printf 'MLFLOW_TRACKING_URI=%q\nMLFLOW_TRACKING_USERNAME=%q\nMLFLOW_TRACKING_PASSWORD=%q\n' \
    "$MLFLOW_TRACKING_URI" "$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD" > "$staging"
mv "$staging" "$target"
