// Validates ServiceMonitor and PrometheusRule objects (a JSON array on stdin) against the schemas
// shipped in the npm package @kubernetes-models/prometheus-operator (ESM only).
// Usage: node tests/validate_prometheus_operator.mjs NODE_MODULES_DIR < objects.json
import path from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const load = async (kind) => {
  const file = path.join(modules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
                         `${kind}.js`);
  return (await import(pathToFileURL(file).href))[kind];
};
const kinds = { ServiceMonitor: await load("ServiceMonitor"), PrometheusRule: await load("PrometheusRule") };

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const object of JSON.parse(input)) {
  const Kind = kinds[object.kind];
  if (!Kind) {
    console.error(`no schema for kind ${object.kind}`);
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
