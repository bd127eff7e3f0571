"""`tandem workflow run`: submit an API-format workflow to a running ComfyUI, follow it, download its outputs.

Talks to the server's public HTTP API and websocket (POST /prompt, /ws, /history, /view); nothing here
imports ComfyUI.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path, PurePosixPath


class WorkflowError(RuntimeError):
    """The server refused the workflow, a node failed, or the run was interrupted: a readable message."""


def load_workflow(path: str | Path) -> dict:
    """Reads an API-format workflow ({node id: {"class_type", "inputs"}}); refuses the UI format with a hint, and
    a device, a pipe or a file too large to be a workflow (validation.read_json) naming the file."""
    from ..runtime.validation import read_json

    if not Path(path).exists():
        raise WorkflowError(f"workflow file not found: {path}")
    try:
        data = read_json(path, "workflow file")
    except ValueError as exc:
        raise WorkflowError(str(exc)) from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(f"{path} is a UI-format workflow; in ComfyUI use Workflow > Export (API) and run that file")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise WorkflowError(f"{path} is not an API-format workflow (expected {{node id: {{class_type, inputs}}}})")
    return data


def _shown(setting: str, limit: int = 60) -> str:
    """A --set argument as a refusal quotes it: whole, or its start and its length."""
    return repr(setting) if len(setting) <= limit else f"{setting[:limit]!r}... ({len(setting)} characters)"


def parse_setting(setting: str) -> tuple[str, str, object]:
    """"NODE.INPUT=VALUE" -> (NODE, INPUT, value). VALUE is read as JSON when it parses (numbers, true, lists),
    else as a string; NaN and infinities (also 1e999), and numbers too long to read, are refused."""
    target, sep, raw = setting.partition("=")
    node_ref, dot, name = target.rpartition(".")
    if not sep or not dot or not node_ref or not name:
        raise WorkflowError(f"--set {_shown(setting)}: write NODE.INPUT=VALUE, e.g. --set 3.seed=7")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except ValueError:  # an integer of more digits than Python reads (sys.get_int_max_str_digits)
        digits = sum(c.isdigit() for c in raw)
        raise WorkflowError(f"--set {_shown(setting)}: its value is a number of {digits} digits, more than the "
                            f"{sys.get_int_max_str_digits()} a number may have; give a shorter one") from None
    except RecursionError:
        raise WorkflowError(f"--set {_shown(setting)}: its value nests lists or objects too deeply to read") from None
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise WorkflowError(f"--set {_shown(setting)}: {raw} is not a finite number; give a finite value") from None
    return node_ref, name, value


def apply_settings(workflow: dict, settings: list[str], declared_inputs=None) -> dict:
    """Applies "NODE.INPUT=VALUE" overrides (parse_setting); NODE is a node id, a node title or a class_type (if
    unique). INPUT must be one the node has in the workflow or, when `declared_inputs(class_type)` is given, one
    its class declares (the server's /object_info: an optional input the export left out); a misspelt name fails
    here, before any run."""
    workflow = json.loads(json.dumps(workflow))
    for setting in settings:
        node_ref, name, value = parse_setting(setting)
        matches = [i for i, node in workflow.items()
                   if node_ref in (i, node.get("_meta", {}).get("title"), node["class_type"])]
        if len(matches) != 1:
            found = "no node" if not matches else f"{len(matches)} nodes ({', '.join(matches)})"
            raise WorkflowError(f"--set {_shown(setting)}: {found} match {node_ref!r}; use a node id")
        node = workflow[matches[0]]
        inputs = node.setdefault("inputs", {})
        if name not in inputs and name not in (declared_inputs(node["class_type"]) if declared_inputs else ()):
            known = ", ".join(sorted(inputs)) or "none in this workflow"
            raise WorkflowError(f"--set {_shown(setting)}: node {matches[0]} ({node['class_type']}) has no input "
                                f"{name!r} (its inputs: {known})")
        inputs[name] = value
    return workflow


def _describe_rejection(body: dict) -> str:
    error = body.get("error", {})
    parts = [error.get("message", "the server refused the workflow")]
    if error.get("details"):
        parts.append(error["details"])
    for node_id, node_error in (body.get("node_errors") or {}).items():
        for item in node_error.get("errors", []):
            parts.append(f"node {node_id} ({node_error.get('class_type')}): {item.get('message')}: {item.get('details')}")
    return "; ".join(parts)


class ComfyClient:
    def __init__(self, server: str, timeout_s: float = 30.0):
        self.server = server.rstrip("/")
        self.timeout_s = timeout_s
        self.client_id = str(uuid.uuid4())

    def _open(self, route: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.server + route, data=data, headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                message = _describe_rejection(json.loads(body))
            except (json.JSONDecodeError, AttributeError):
                message = body.decode(errors="replace")[:500] or str(exc)
            raise WorkflowError(f"{self.server}{route}: HTTP {exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            raise WorkflowError(f"cannot reach ComfyUI at {self.server}: {exc.reason}") from None

    def get_json(self, route: str) -> dict:
        with self._open(route) as response:
            return json.loads(response.read())

    def declared_inputs(self, class_type: str) -> set[str]:
        """The inputs (required and optional) the server declares for node class `class_type`."""
        info = self.get_json(f"/object_info/{urllib.parse.quote(class_type)}").get(class_type, {})
        return {name for group in ("required", "optional") for name in info.get("input", {}).get(group, {})}

    def submit(self, workflow: dict) -> str:
        with self._open("/prompt", {"prompt": workflow, "client_id": self.client_id}) as response:
            return json.loads(response.read())["prompt_id"]

    def download(self, item: dict, folder: Path) -> Path:
        """Saves one output file as folder/SUBFOLDER/NAME, as the server files it (so two outputs of one name in
        different subfolders stay apart); path parts that would leave `folder` are dropped."""
        query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        parts = [part for part in PurePosixPath(item.get("subfolder", ""), item["filename"]).parts
                 if part not in ("", ".", "..", "/")]
        target = folder.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._open(f"/view?{query}") as response:
            target.write_bytes(response.read())
        return target


def follow(client: ComfyClient, prompt_id: str, socket, progress) -> None:
    """Reads the websocket until `prompt_id` finishes; raises WorkflowError on a node error or interrupt."""
    while True:
        message = socket.recv()
        if not isinstance(message, str):
            continue  # binary frames are previews
        event = json.loads(message)
        kind, data = event.get("type"), event.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if kind == "progress":
            progress(data.get("node"), data.get("value", 0), data.get("max", 0))
        elif kind == "execution_error":
            raise WorkflowError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                f"{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}")
        elif kind == "execution_interrupted":
            raise WorkflowError(f"the run was interrupted at node {data.get('node_id')} ({data.get('node_type')})")
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                              and data.get("prompt_id") == prompt_id):
            return


def wait_for_history(client: ComfyClient, prompt_id: str, timeout_s: float = 30.0) -> dict:
    """The run's history entry. ComfyUI announces success before it records the entry, so wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        entry = client.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None:
            return entry
        if time.monotonic() > deadline:
            raise WorkflowError(f"the run finished but ComfyUI recorded no history for it within {timeout_s:g} s")
        time.sleep(0.1)


class Session:
    """A client and its open websocket: runs workflows one after another and follows each to its end."""

    def __init__(self, server: str, timeout_s: float = 3600.0):
        import websocket  # websocket-client

        self.client = ComfyClient(server)
        self.timeout_s = timeout_s
        ws_url = self.client.server.replace("http", "ws", 1) + f"/ws?clientId={self.client.client_id}"
        try:
            self.socket = websocket.create_connection(ws_url, timeout=timeout_s)
        except (OSError, websocket.WebSocketException) as exc:
            raise WorkflowError(f"cannot open the websocket of {server}: {exc}") from None

    def run(self, workflow: dict, progress=lambda node, value, total: None) -> dict:
        """Runs `workflow` to its end; returns its history entry."""
        import websocket

        prompt_id = self.client.submit(workflow)
        try:
            follow(self.client, prompt_id, self.socket, progress)
        except websocket.WebSocketTimeoutException:
            raise WorkflowError(f"no word from the server for {self.timeout_s:g} s") from None
        return wait_for_history(self.client, prompt_id)

    def download_outputs(self, entry: dict, folder: Path) -> dict[str, Path]:
        """The run's output files, downloaded into `folder`, keyed "node id/kind/position" (e.g. "9/images/0")."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for node_id, node in entry.get("outputs", {}).items():
            for kind, items in node.items():
                listed = [item for item in items if isinstance(item, dict) and "filename" in item] \
                    if isinstance(items, list) else []
                for position, item in enumerate(listed):
                    files[f"{node_id}/{kind}/{position}"] = self.client.download(item, folder)
        return files

    def close(self) -> None:
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_workflow(path: str, server: str, settings: list[str], out_dir: str, timeout_s: float = 3600.0,
                 progress=lambda node, value, total: None) -> list[Path]:
    """Runs the workflow to completion; returns the downloaded output files."""
    workflow = apply_settings(load_workflow(path), settings, ComfyClient(server).declared_inputs)
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails before the run
    with Session(server, timeout_s) as session:
        entry = session.run(workflow, progress)
        return list(session.download_outputs(entry, Path(out_dir)).values())
