// The monitor's access token, for the page's API calls (loaded before the page's
// own script, by dispynb's monitor and by dispynb-scheduler's).
// It lives in this tab's sessionStorage, which is scoped to scheme, host and port,
// and never in a cookie: browsers send a cookie of 127.0.0.1 to every port of
// 127.0.0.1, so any other local server the user visits would receive it.
"use strict";

const TOKEN_KEY = "dispynb-monitor-token";

// The server redirects `/?token=...` to `/#token=...`: keep it, clean the address bar.
(function takeToken() {
  const match = /^#token=([A-Za-z0-9._~-]+)$/.exec(window.location.hash);
  if (match) {
    window.sessionStorage.setItem(TOKEN_KEY, match[1]);
    window.history.replaceState(null, "", window.location.pathname);
  }
})();

// Headers that authenticate a request (none without a token: the server then says
// to open the URL the monitor printed).
function authHeaders() {
  const token = window.sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Token ${token}` } : {};
}
