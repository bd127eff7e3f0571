// ComfyUI frontend extension: a "Tandem" sidebar tab with the pool's devices, state and last run.
import { app } from "../../scripts/app.js";
import { mountPanel } from "./tandem_panel.js";

app.registerExtension({
  name: "tandem.multigpu.panel",
  setup() {
    app.extensionManager?.registerSidebarTab?.({
      id: "tandem",
      icon: "pi pi-server",
      title: "Tandem",
      tooltip: "Multi-GPU pool (Tandem)",
      type: "custom",
      render: (el) => mountPanel(el),
    });
  },
});
