// Validates custom resources against the validators generated from their CRDs' OpenAPI schemas
// (npm kubernetes-models: @kubernetes-models/prometheus-operator, @kubernetes-models/keda).
// Usage: node crd_validate.mjs NODE_MODULES_DIR < docs.json   (a JSON array of resources)
// Prints a JSON array, one entry per resource: {"kind", "name", "error"} with error null when valid.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const MODELS = {
  "monitoring.coreos.com/v1": ["@kubernetes-models/prometheus-operator", "monitoring.coreos.com/v1"],
  "keda.sh/v1alpha1": ["@kubernetes-models/keda", "keda.sh/v1alpha1"],
};

const nodeModules = process.argv[2];
const docs = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const doc of docs) {
  const entry = { kind: doc.kind, name: doc.metadata?.name ?? null, error: null };
  const model = MODELS[doc.apiVersion];
  if (!model) {
    entry.error = `no CRD validator for ${doc.apiVersion}`;
  } else {
    try {
      const module = await import(pathToFileURL(join(nodeModules, model[0], model[1], `${doc.kind}.js`)).href);
      new module[doc.kind](doc).validate();
    } catch (e) {
      entry.error = e.message;
    }
  }
  results.push(entry);
}
process.stdout.write(JSON.stringify(results));
