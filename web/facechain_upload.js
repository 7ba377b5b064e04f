// Load Face Photos: an "upload photos" button that sends photos from this computer into a folder of ComfyUI's
// input directory through the host's own /upload/image, then refreshes the folder list and selects the folder.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "FaceChainLoadPhotos";
// The photo types the node reads, from the node's own definition (its folder input's photo_extensions).
let PHOTO_EXTENSIONS = [];
const TITLE = "Upload photos (FaceChain)";

// Why a folder name cannot be used, or null when it can. The server refuses names that leave input/ too
// (the host's upload and the node both check); this says so before anything is sent.
export function folderProblem(name) {
  if (!name) return "Type a folder name, for example people/anna.";
  if (/[\u0000-\u001f\u007f]/.test(name)) return "The folder name contains a control character; type it again.";
  if (/^[\\/]/.test(name)) return `'${name}' is an absolute path; type a folder inside ComfyUI's input directory.`;
  if (/^[A-Za-z]:/.test(name)) return `'${name}' starts with a drive letter; type a folder inside the input directory.`;
  if (name.includes("\\")) return `'${name}' contains '\\'; separate folders with '/', as in people/anna.`;
  const parts = name.split("/");
  if (parts.includes("..")) return `'${name}' contains '..', which would leave ComfyUI's input directory.`;
  if (parts.some((p) => p === "" || p === ".")) {
    return `'${name}' has an empty part ('//', '/.' or a '/' at the end); type it as people/anna.`;
  }
  if (parts.some((p) => p.startsWith("."))) {
    return `'${name}' has a part starting with '.'; hidden folders are not listed.`;
  }
  if (parts.some((p) => new TextEncoder().encode(p).length > 200)) return "A part of the folder name is too long.";
  return null;
}

function isPhoto(file) {
  const name = file.name.toLowerCase();
  return PHOTO_EXTENSIONS.some((ext) => name.endsWith(ext));
}

function toast(severity, detail) {
  const toastStore = app.extensionManager?.toast;
  if (toastStore) toastStore.add({ severity, summary: TITLE, detail, life: severity === "error" ? 15000 : 5000 });
  else if (severity === "error") alert(detail);
}

async function askFolder(current) {
  const dialog = app.extensionManager?.dialog;
  const message = "Folder inside ComfyUI's input directory (an existing one or a new name)";
  const value = dialog ? await dialog.prompt({ title: TITLE, message, defaultValue: current })
                       : window.prompt(message, current);
  return value == null ? null : String(value).trim();
}

async function uploadOne(file, folder) {
  const body = new FormData();
  body.append("image", file, file.name);
  body.append("subfolder", folder);
  body.append("type", "input");
  body.append("overwrite", "false"); // a different photo of the same name is kept as 'name (1).jpg'
  const res = await api.fetchApi("/upload/image", { method: "POST", body });
  if (res.status !== 200) {
    throw new Error(`${file.name}: the server refused the upload (${res.status} ${res.statusText})`);
  }
  return await res.json();
}

async function uploadPhotos(node, files) {
  const folderWidget = node.widgets?.find((w) => w.name === "folder");
  const photos = files.filter(isPhoto);
  if (!photos.length) {
    toast("error", `None of the chosen files is a photo (${PHOTO_EXTENSIONS.join(", ")}).`);
    return;
  }
  const folder = await askFolder(folderWidget?.value ?? "");
  if (folder === null) return;
  const problem = folderProblem(folder);
  if (problem) {
    toast("error", problem);
    return;
  }
  const failed = [];
  let done = 0;
  for (const file of photos) {
    try {
      await uploadOne(file, folder);
      done += 1;
    } catch (e) {
      failed.push(String(e.message || e));
    }
  }
  if (done) {
    await app.refreshComboInNodes();
    if (folderWidget) {
      if (!folderWidget.options.values.includes(folder)) folderWidget.options.values.push(folder);
      folderWidget.value = folder;
      folderWidget.callback?.(folder);
    }
    node.setDirtyCanvas(true, true);
  }
  const skipped = files.length - photos.length;
  const summary = `Uploaded ${done} of ${photos.length} photos to input/${folder}` +
    (skipped ? `; ${skipped} files that are not photos were left out` : "") + ".";
  toast(failed.length || !done ? "error" : "success", [summary, ...failed].join("\n"));
}

function addUploadButton(node) {
  const chooser = document.createElement("input");
  Object.assign(chooser, { type: "file", multiple: true, accept: ["image/*", ...PHOTO_EXTENSIONS].join(",") });
  chooser.style.display = "none";
  chooser.dataset.facechainUpload = String(node.id);
  chooser.onchange = () => {
    const files = Array.from(chooser.files || []);
    chooser.value = "";
    if (files.length) uploadPhotos(node, files);
  };
  document.body.append(chooser);
  const button = node.addWidget("button", "upload_photos", null, () => chooser.click(), { serialize: false });
  button.label = "upload photos";
  // not an input, so kept out of both: the option keeps it out of the API prompt (graphToPrompt reads
  // options.serialize), the property out of a saved workflow's widgets_values (the node's serialize reads it)
  button.serialize = false;
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    chooser.remove();
    return onRemoved?.apply(this, arguments);
  };
}

app.registerExtension({
  name: "FaceChain.UploadPhotos",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === NODE_TYPE) PHOTO_EXTENSIONS = nodeData.input?.required?.folder?.[1]?.photo_extensions ?? [];
  },
  async nodeCreated(node) {
    if (node.comfyClass === NODE_TYPE) addUploadButton(node);
  },
});
