// The API key and authenticated fetches. The key lives in sessionStorage (or localStorage when the user
// asks to be remembered) and travels only in the X-API-Key header: never in a URL, never in a log.

const STORE_KEY = "tinkex.apiKey";
// The server root, so that the dashboard also works behind a reverse proxy's path prefix.
export const ROOT = location.pathname.replace(/dashboard\/?$/, "");

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export class SignedOut extends Error {}

export function apiKey() {
  return sessionStorage.getItem(STORE_KEY) ?? localStorage.getItem(STORE_KEY);
}

export function setApiKey(key, remember) {
  forgetApiKey();
  (remember ? localStorage : sessionStorage).setItem(STORE_KEY, key);
}

export function forgetApiKey() {
  sessionStorage.removeItem(STORE_KEY);
  localStorage.removeItem(STORE_KEY);
}

let onSignedOut = () => {};
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

/** Call the tinkex API: `path` is under /api/v1. Answers the JSON body, or throws ApiError. */
export async function api(method, path, body, key = apiKey()) {
  if (!key) {
    onSignedOut();
    throw new SignedOut("no API key");
  }
  const headers = { "X-API-Key": key, Accept: "application/json" };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(`${ROOT}api/v1${path}`, init);
  const data = (response.headers.get("content-type") ?? "").includes("json") ? await response.json() : null;
  if (response.status === 401) {
    forgetApiKey();
    onSignedOut("That API key is not accepted by this server.");
    throw new SignedOut(data?.detail ?? "unauthorized");
  }
  if (!response.ok) {
    const detail = typeof data?.detail === "string" ? data.detail : JSON.stringify(data?.detail ?? response.statusText);
    throw new ApiError(response.status, detail);
  }
  return data;
}

export const get = (path) => api("GET", path);
export const post = (path, body = {}) => api("POST", path, body);
export const del = (path) => api("DELETE", path);
