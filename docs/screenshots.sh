#!/usr/bin/env bash
# Screenshots of a finished study as users see it, in headless Chromium (apt-get install
# chromium): the MLflow UI's runs table through the link `soups run` prints, and the first
# screen of the HTML report. Used for docs/images/ (README "Compare runs").
#   SOUPS_HOME=soups_home bash docs/screenshots.sh smoke docs/images
set -euo pipefail
study=${1:-smoke}
out=${2:-docs/images}
home=$(cd "${SOUPS_HOME:-soups_home}" && pwd)
port=${PORT:-5055}
mkdir -p "$out"
.venv/bin/mlflow server --backend-store-uri "sqlite:///$home/mlflow.db" --host 127.0.0.1 \
  --port "$port" --workers 1 > "$home/screenshot-server.log" 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
link=$(.venv/bin/python - "$study" "$port" <<'PY'
import sys
import mlflow
from study.mlflow_links import runs_table_url
study, port = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
experiment = mlflow.get_experiment_by_name(study).experiment_id
print(runs_table_url(f"http://127.0.0.1:{port}", experiment))
PY
)
echo "runs table: $link"
shoot() {  # URL FILE
  chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size=1850,950 --virtual-time-budget=20000 --screenshot="$2" "$1" 2> /dev/null
}
shoot "$link" "$out/mlflow_runs.png"
SOUPS_HOME="$home" .venv/bin/soups report "$study" --out "$home/$study/report" > /dev/null
shoot "file://$home/$study/report/report.html" "$out/report.png"
echo "wrote $out/mlflow_runs.png $out/report.png"
