// Renders Tandem's pool status (GET /tandem/status) into an element. Used by the ComfyUI sidebar tab
// (tandem.js) and by the standalone page /tandem/panel.

const css = `
.tandem-panel { font: 13px/1.4 system-ui, sans-serif; padding: 10px; color: var(--fg-color, #ddd); }
.tandem-panel h3 { margin: 4px 0 10px; font-size: 15px; }
.tandem-panel table { border-collapse: collapse; width: 100%; margin-bottom: 10px; }
.tandem-panel td { padding: 3px 6px; border-bottom: 1px solid rgba(128,128,128,.25); }
.tandem-panel td:first-child { opacity: .75; white-space: nowrap; }
.tandem-panel .state-running { color: #4caf50; } .tandem-panel .state-error { color: #f44336; }
.tandem-panel .device { display: inline-block; padding: 1px 6px; margin: 1px; border-radius: 4px;
  background: rgba(128,128,128,.2); }`;

function row(label, value) {
  return `<tr><td>${label}</td><td>${value}</td></tr>`;
}

function escape(text) {
  return String(text ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

export function renderStatus(el, status) {
  const run = status.last_run || {};
  const peaks = status.peak_memory_bytes || [];
  const held = status.model_weights_bytes || [];  // the loaded model's weights each worker holds (cut, sharded)
  const mib = (bytes, what) => (bytes == null ? "" : ` · ${(bytes / 2 ** 20).toFixed(0)} MiB ${what}`);
  const devices = (status.devices || [])
    .map((d, i) => `<span class="device">${escape(d)} #${i}${mib(held[i], "weights")}${mib(peaks[i], "peak")}</span>`)
    .join("");
  const lastRun = run.calls
    ? row("strategy", escape(run.mesh || run.strategy)) +
      row("model calls", run.calls) +
      row("time per call", `${(1000 * run.median_seconds_per_call).toFixed(1)} ms (median)`) +
      row("device utilisation", `${(100 * run.device_utilisation).toFixed(0)}% <small>(devices' compute time / (devices x wall time); not a speed-up)</small>`)
    : row("last run", "none yet");
  el.innerHTML = `<style>${css}</style><div class="tandem-panel">
    <h3>Tandem · multi-GPU sampling</h3>
    <table>${row("pool", `<span class="state-${escape(status.state)}">${escape(status.state)}</span>`)}
      ${row("devices", devices || "none")}
      ${row("start mode", escape(status.mode))}
      ${status.error ? row("error", escape(status.error)) : ""}
      ${row("runs on the pool", status.runs ?? 0)}</table>
    <table>${lastRun}</table></div>`;
}

export async function refresh(el, base = "") {
  try {
    const response = await fetch(`${base}/tandem/status`);
    renderStatus(el, await response.json());
  } catch (error) {
    el.textContent = `Tandem status unavailable: ${error}`;
  }
}

export function mountPanel(el, base = "", everyMs = 2000) {
  refresh(el, base);
  const timer = setInterval(() => (el.isConnected ? refresh(el, base) : clearInterval(timer)), everyMs);
}
