/**
 * reconnect.js: when a connection to chatproxy counts as lost, and when to reattach to its
 * stream. Both transports (sse.js, websocket.js) resume by these rules:
 *
 * The first attempt follows a drop quickly (RESUME_FIRST_DELAY_MS), later ones back off, doubling
 * up to the server's `retry:` advice (at most MAX_RESUME_DELAY_MS); while the browser reports
 * itself offline the client waits for it to come back online instead. `maxResumes` consecutive
 * attempts without progress end the answer.
 */

/**
 * No bytes at all (not even a keepalive, sent every KEEPALIVE s, 10 s by default) for this long
 * means the connection is dead even if the browser has not noticed yet.
 */
export const DEFAULT_IDLE_TIMEOUT_MS = 60_000;
/** Consecutive resume attempts that bring nothing new before the answer is given up. */
export const DEFAULT_MAX_RESUMES = 4;
// The first resume follows a drop quickly: the server keeps generating for RESUME.GRACE seconds
// only. Later attempts wait twice as long each time, up to the server's `retry:` advice.
const RESUME_FIRST_DELAY_MS = 250;
const MAX_RESUME_DELAY_MS = 5_000;
// While the browser says it is offline, resuming waits for the `online` event, at most this long.
const MAX_OFFLINE_WAIT_MS = 60_000;

/** Resolves after `ms`, or at once when `signal` aborts. */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** Whether the browser reports having no network (navigator.onLine is false). */
function browserOffline() {
  return globalThis.navigator?.onLine === false;
}

/** Resolves on the `online` event, on abort, or after `maxMs`. */
function waitForOnline(signal, maxMs = MAX_OFFLINE_WAIT_MS) {
  return new Promise((resolve) => {
    if (signal?.aborted || typeof globalThis.addEventListener !== "function") return resolve();
    const timer = setTimeout(done, maxMs);
    function done() {
      clearTimeout(timer);
      globalThis.removeEventListener("online", done);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    globalThis.addEventListener("online", done, { once: true });
    signal?.addEventListener("abort", done, { once: true });
  });
}

/**
 * The wait before resume attempt `attempt` (1, 2, ...): doubling, capped by the server's advice.
 * @param {number} attempt
 * @param {number|null} [retryMs]  the server's last `retry:` value, if any
 * @returns {number} milliseconds
 */
export function resumeDelayMs(attempt, retryMs = null) {
  const cap = Math.min(retryMs ?? MAX_RESUME_DELAY_MS, MAX_RESUME_DELAY_MS);
  return Math.max(0, Math.min(RESUME_FIRST_DELAY_MS * 2 ** Math.max(0, attempt - 1), cap));
}

/**
 * Wait before a resume attempt: resumeDelayMs(), and while the browser is offline, until it is
 * back online (an attempt then follows at once). Returns early when `signal` aborts.
 */
export async function waitToResume(attempt, retryMs, signal) {
  if (!browserOffline()) await sleep(resumeDelayMs(attempt, retryMs), signal);
  if (browserOffline()) await waitForOnline(signal);
}
