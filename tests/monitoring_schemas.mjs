// Validates Prometheus Operator objects (PodMonitor, ServiceMonitor, PrometheusRule)
// against the schemas of the npm package @kubernetes-models/prometheus-operator.
// Usage: node monitoring_schemas.mjs NODE_MODULES < objects.json
// Prints a JSON list with one entry per object: null when valid, else the errors.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const root = join(process.argv[2], "@kubernetes-models", "prometheus-operator");
const objects = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const object of objects) {
  const [group, version] = object.apiVersion.split("/");
  const file = join(root, group, version, `${object.kind}.js`);
  const module = await import(pathToFileURL(file).href);
  try {
    new module[object.kind](object).validate();
    results.push(null);
  } catch (error) {
    results.push(error.message);
  }
}
console.log(JSON.stringify(results));
