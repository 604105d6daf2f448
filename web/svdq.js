// svdq front-end extension: shows what the svdq nodes report (precision, rank, size and memory saved of a loaded
// model; where the in-graph quantization saved its file) in a read-only text box on the node. Progress of long
// svdq work (calibration, per-layer quantization) comes through ComfyUI's own progress bar on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set(["SVDQLoadDiffusionModel", "SVDQQuantizeModel"]);

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === "svdq_info");
  if (!widget) {
    widget = ComfyWidgets["STRING"](node, "svdq_info", ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.75;
    widget.serialize = false;
  }
  widget.value = text;
  node.setSize([Math.max(node.size[0], 320), node.computeSize()[1]]);
  app.graph.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "svdq.ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text || []).join("\n");
      if (text) showText(this, text);
    };
  },
});
