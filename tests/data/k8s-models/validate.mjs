// node validate.mjs < objects.json: validates each ServiceMonitor object (a JSON array on stdin)
// against prometheus-operator's CRD schema, as compiled by @kubernetes-models/prometheus-operator.
// Prints {"ok": true} or {"ok": false, "errors": [...]}; exits 0 either way (1 on a crash).
import { ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const errors = [];
for (const object of JSON.parse(Buffer.concat(chunks).toString())) {
  try {
    new ServiceMonitor(object).validate();
  } catch (err) {
    errors.push(String(err && err.message ? err.message : err));
  }
}
process.stdout.write(`${JSON.stringify({ ok: errors.length === 0, errors })}\n`);
