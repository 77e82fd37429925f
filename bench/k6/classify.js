// Single-text Classify at a constant arrival rate (open loop: k6 starts calls on schedule, whether or not
// earlier replies have come back), over gRPC with k6's k6/net/grpc module.
//
// Run through bench/run_k6.py (it writes the text and tenant files and parses the summary):
//   k6 run --no-usage-report --summary-export=summary.json bench/k6/classify.js
// Environment: TARGET (host:port), PROTO_ROOT (the repository's proto/ folder), TEXTS_FILE and TENANTS_FILE
// (JSON arrays of strings), RATE (calls/s), DURATION (e.g. "20s"), VUS (pre-allocated VUs), MAX_VUS.
import grpc from 'k6/net/grpc';
import { check } from 'k6';
import { SharedArray } from 'k6/data';

const TEXTS = new SharedArray('texts', () => JSON.parse(open(__ENV.TEXTS_FILE)));
const TENANTS = new SharedArray('tenants', () => JSON.parse(open(__ENV.TENANTS_FILE)));

export const options = {
  scenarios: {
    classify: {
      executor: 'constant-arrival-rate',
      rate: parseInt(__ENV.RATE || '50', 10),
      timeUnit: '1s',
      duration: __ENV.DURATION || '20s',
      // Enough VUs that a slow reply never delays the next call (a delayed call is counted in
      // dropped_iterations instead of silently lowering the rate).
      preAllocatedVUs: parseInt(__ENV.VUS || '20', 10),
      maxVUs: parseInt(__ENV.MAX_VUS || '200', 10),
    },
  },
  // The percentiles the benchmark reports; the summary export only carries the ones listed here.
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
};

// The .proto file rather than server reflection: the same request shape whatever the server exposes.
const client = new grpc.Client();
client.load([__ENV.PROTO_ROOT], 'headswap/v1/headswap.proto');

let connected = false;

export default function () {
  if (!connected) {
    // One connection per VU, made on its first call and kept: a connection per call would measure TCP set-up.
    client.connect(__ENV.TARGET, { plaintext: true, reflect: false });
    connected = true;
  }
  const i = Math.floor(Math.random() * 1e9);
  const request = {
    tenant: TENANTS[i % TENANTS.length],
    inputs: [{ text: TEXTS[i % TEXTS.length] }],
    top_k: 1,
  };
  const response = client.invoke('headswap.v1.HeadswapService/Classify', request);
  check(response, {
    'status is OK': (r) => r && r.status === grpc.StatusOK,
    'has a label': (r) => r && r.message && r.message.predictions.length === 1,
  });
}
