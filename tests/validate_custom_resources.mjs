// Validates custom resources (a JSON array on stdin) against the schemas shipped in the npm
// packages of @kubernetes-models (ESM only): the Prometheus Operator's and cert-manager's.
// Usage: node tests/validate_custom_resources.mjs NODE_MODULES_DIR < objects.json
import path from "node:path";
import { pathToFileURL } from "node:url";

const packages = {
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
  "cert-manager.io": "@kubernetes-models/cert-manager",
};
const modules = process.argv[2];
const load = async (apiVersion, kind) => {
  const [group, version] = apiVersion.split("/");
  if (!packages[group]) return undefined;
  const file = path.join(modules, packages[group], group, version, `${kind}.js`);
  try {
    return (await import(pathToFileURL(file).href))[kind];
  } catch {
    return undefined;
  }
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const object of JSON.parse(input)) {
  const Kind = await load(object.apiVersion, object.kind);
  if (!Kind) {
    console.error(`no schema for ${object.apiVersion} ${object.kind}`);
    failed += 1;
    continue;
  }
  try {
    new Kind(object).validate();
    console.log(`valid ${object.kind}/${object.metadata.name}`);
  } catch (error) {
    console.error(`invalid ${object.kind}/${object.metadata.name}: ${error.message}`);
    failed += 1;
  }
}
process.exit(failed ? 1 : 0);
