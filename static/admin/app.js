/* iflow2api web admin: one page, vanilla JS, no build step.
 *
 * It talks only to the JSON API under /admin/api/. The session lives in an HttpOnly
 * cookie that this script never sees; every change (POST/PUT/DELETE) carries the CSRF
 * token that the session, setup and login answers hand out.
 * Dynamic text is always set with textContent, never innerHTML: log lines, account
 * labels and model answers come from outside and must not become markup.
 */
(function () {
  'use strict';

  const t = window.I18n.t;
  const POLL_MS = 2000;            // dashboard numbers refresh this often
  const OAUTH_POLL_MS = 1000;      // browser sign-in state is checked this often
  const MAX_LOG_LINES = 1000;      // the live log keeps this many lines in the page
  const USAGE_MAX_AGE_MS = 60000;  // the usage history is asked again at least this often while shown
  const USAGE_RANGES = ['24h', '7d', '30d'];
  const STORE = {
    theme: 'iflow2api.theme', lang: 'iflow2api.lang', tab: 'iflow2api.tab',
    pgApi: 'iflow2api.playgroundApi', // the playground's API: "chat" or "responses"
    updateDismissed: 'iflow2api.updateDismissed', // the release version whose notice was dismissed
    usageRange: 'iflow2api.usageRange', // the usage history's range: 24h, 7d or 30d
  };
  // The tabs themselves (what each loads, draws and does) are the SCREENS registry near the end.

  const state = {
    csrf: null,
    loggedIn: false,
    version: '',
    tab: 'dashboard',
    pollTimer: null,
    logSource: null,
    logRetryTimer: null,
    logLines: [],
    logRenderQueued: false,
    update: null,              // {latest, current, url} from the last status answer, or null
    presets: new Map(),        // provider presets seen, by name (unconfigured providers are presets)
    instances: [],             // last instances list (this page's instance names the others)
    config: null,              // last GET /admin/api/config answer
    keysExist: false,          // any client API key? then curl needs an Authorization header
    oauth: null,               // {session, timer} while a browser sign-in runs
    pgAbort: null,             // AbortController of the running playground request
    pgMeta: null,              // () => the playground's status line, said again on a language change
    loginWaitTimer: null,
    usage: {                   // the dashboard's usage history (usageDue, fetchUsage, renderUsage)
      range: '7d',
      data: null,              // the last GET /admin/api/usage answer for `range`, or null
      error: '',               // why the last fetch failed ('' when it did not)
      fetchedAt: 0,            // Date.now() of the last fetch's start
      seq: 0,                  // answers to older fetches (another range) are dropped
      settled: null,           // the status request count the last fetch surely includes
      count: null,             // the status request count last seen, and since when:
      countSeenAt: 0,
      drawn: null,             // what the charts show: {days (gaps filled), models, providers}
      look: '',                // what they were drawn from (range, today, language, answer)
    },
  };

  // ---------------------------------------------------------------------------------
  // Small DOM helpers

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $$(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  /** el('button', {class: 'x', 'data-action': 'stop', text: 'Stop'}, child...) */
  function el(tag, attrs) {
    const node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      const value = attrs[name];
      if (value === null || value === undefined || value === false) return;
      if (name === 'text') node.textContent = value;
      else if (name === 'class') node.className = value;
      else node.setAttribute(name, value === true ? '' : String(value));
    });
    for (let i = 2; i < arguments.length; i++) {
      const child = arguments[i];
      if (child !== null && child !== undefined) node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
    }
    return node;
  }

  function storeGet(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return null; } // private mode
  }
  function storeSet(key, value) {
    try { window.localStorage.setItem(key, value); } catch (e) { /* not remembered, still works */ }
  }

  // ---------------------------------------------------------------------------------
  // Formatting

  function fmtInt(n) { return typeof n === 'number' && isFinite(n) ? String(Math.round(n)) : '–'; }

  function fmtMs(n) {
    if (typeof n !== 'number' || !isFinite(n)) return '–';
    return (n >= 100 ? Math.round(n) : Math.round(n * 10) / 10) + ' ms';
  }

  function fmtDuration(seconds) {
    if (typeof seconds !== 'number' || !isFinite(seconds)) return '–';
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    const parts = [];
    if (d) parts.push(d + t('unit.d'));
    if (d || h) parts.push(h + t('unit.h'));
    if (!d && (h || m)) parts.push(m + t('unit.m'));
    if (!d && !h) parts.push(s + t('unit.s'));
    return parts.join(' ');
  }

  /** Expiry as sent by the server: a date string, epoch seconds or nothing. */
  function fmtExpiry(value) {
    if (value === null || value === undefined || value === '') return '–';
    const date = typeof value === 'number' ? new Date(value * (value < 1e12 ? 1000 : 1)) : new Date(value);
    return isNaN(date.getTime()) ? String(value) : date.toLocaleString(langTag());
  }

  // ---------------------------------------------------------------------------------
  // Toast: one line of feedback for the last action (tests read #toast)

  let toastTimer = null;
  function toast(message, kind) {
    const box = $('#toast');
    box.textContent = message;
    box.dataset.kind = kind || 'info';
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { box.hidden = true; }, kind === 'error' ? 8000 : 4000);
  }

  /** What to tell the user about an error; '' when it was already handled (signed out). */
  function errorText(err) {
    if (err && err.silent) return '';
    return (err && err.message) || String(err);
  }

  function reportError(err) {
    const message = errorText(err);
    if (message) toast(message, 'error');
  }

  // ---------------------------------------------------------------------------------
  // API access

  class ApiError extends Error {
    constructor(status, message, code, retryAfter, param) {
      super(message);
      this.status = status;
      this.code = code || '';
      this.retryAfter = retryAfter || 0;
      this.param = param || ''; // the request field the error is about (config key), if any
      this.silent = false;
    }
  }

  async function readJson(res) {
    const text = await res.text();
    if (!text) return {};
    try { return JSON.parse(text); } catch (e) { return { error: { message: text.slice(0, 300) } }; }
  }

  function errorFrom(res, data) {
    const info = (data && data.error) || {};
    const message = typeof info === 'string' ? info : (info.message || (res.status + ' ' + res.statusText));
    const retry = parseInt(res.headers.get('retry-after') || '0', 10) || 0;
    return new ApiError(res.status, message, info.code || info.type, retry, info.param);
  }

  function requestOptions(method, body, signal) {
    const headers = {};
    const opts = { method: method, headers: headers, credentials: 'same-origin', cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    if (method !== 'GET' && state.csrf) headers['X-CSRF-Token'] = state.csrf;
    if (signal) opts.signal = signal;
    return opts;
  }

  /**
   * Whether an error says this admin session is gone (expired, signed out elsewhere): the
   * server marks that one with the code "admin_session". Any other 401 (a wrong password, an
   * upstream refusing a key in the playground) is an error to show like any other.
   */
  function sessionEnded(err) { return err.status === 401 && err.code === 'admin_session'; }

  /** An error from the server; when it ends the session, back to the sign-in screen. */
  function failure(res, data) {
    const err = errorFrom(res, data);
    if (sessionEnded(err)) {
      signedOut(true);
      err.silent = true;
    }
    return err;
  }

  /** fetch /admin/api/<path> and return the parsed JSON, or throw ApiError. */
  async function api(method, path, body) {
    let res;
    try {
      res = await fetch('/admin/api/' + path, requestOptions(method, body));
    } catch (e) {
      throw new ApiError(0, t('error.network'), 'network');
    }
    const data = await readJson(res);
    if (res.ok) return data;
    throw failure(res, data);
  }

  function enc(part) { return encodeURIComponent(part); }

  // ---------------------------------------------------------------------------------
  // Forms: every "check the input, send it, show the outcome" action goes through submitForm

  /** A problem with the input, found before anything is sent (see refuse). */
  class Refusal extends Error {
    constructor(message, kind) {
      super(message);
      this.kind = kind || 'error';
    }
  }

  /** Stop a form's read(): show the message (none: stop quietly), send nothing. */
  function refuse(message, kind) { throw new Refusal(message || '', kind); }

  /**
   * The handler of a form's submit (or a button's click), from a spec:
   *   button           selector of the button that is disabled while the request runs
   *   error            optional selector of the form's error line; without it messages are toasts
   *   read()           the request from the inputs; calls refuse(message) when they are not usable
   *   confirm(input)   optional: a question to ask first (may be async); nothing: no question.
   *                    Answering no sends nothing
   *   send(input)      the API call; resolves to its answer
   *   done(answer, input)  show the success: toast, clear inputs, redraw (may be async)
   *   failed(err)      optional: the text to show for a failed send, or nothing when it handled
   *                    the error itself; by default the error's own message
   */
  function submitForm(spec) {
    const say = function (message, kind) {
      if (!message) return;
      if (spec.error) $(spec.error).textContent = message;
      else toast(message, kind);
    };
    return async function (event) {
      if (event) event.preventDefault();
      if (spec.error) $(spec.error).textContent = '';
      let input;
      try {
        input = spec.read ? spec.read() : undefined;
      } catch (err) {
        return say(err.message, err.kind || 'error');
      }
      const button = $(spec.button);
      let failure = null;
      button.disabled = true;
      try {
        const question = spec.confirm ? await spec.confirm(input) : '';
        if (!question || await confirmAction(question)) {
          const answer = await spec.send(input);
          if (spec.done) await spec.done(answer, input);
        }
      } catch (err) {
        failure = err;
      } finally {
        button.disabled = false;
      }
      // After the button is back, so failed() may disable it again (login: wait before retrying).
      if (failure) say(spec.failed ? spec.failed(failure) : errorText(failure), 'error');
    };
  }

  // ---------------------------------------------------------------------------------
  // Theme and language (both remembered in localStorage)

  const darkQuery = window.matchMedia ? window.matchMedia('(prefers-color-scheme: dark)') : null;

  function themePreference() {
    const saved = storeGet(STORE.theme);
    return saved === 'light' || saved === 'dark' ? saved : 'system';
  }

  function applyTheme() {
    const pref = themePreference();
    const dark = pref === 'dark' || (pref === 'system' && darkQuery !== null && darkQuery.matches);
    document.documentElement.dataset.theme = dark ? 'dark' : 'light';
    $('#theme-select').value = pref;
  }

  function initialLanguage() {
    const saved = storeGet(STORE.lang);
    if (saved === 'en' || saved === 'zh') return saved;
    const langs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || 'en'];
    return String(langs[0]).toLowerCase().indexOf('zh') === 0 ? 'zh' : 'en';
  }

  function langTag() { return window.I18n.getLanguage() === 'zh' ? 'zh-CN' : 'en'; }

  function applyLanguage(lang) {
    window.I18n.setLanguage(lang); // sets <html lang> and every [data-i18n] text
    $('#lang-select').value = window.I18n.getLanguage();
    document.title = t('app.title');
    // Texts built by code are drawn again.
    renderUpdateNotice();
    if (state.loggedIn) refreshTab(state.tab, true);
    updateLogState();
    updateCurl();
    if (state.pgMeta) showPlaygroundMeta(state.pgMeta);
  }

  // ---------------------------------------------------------------------------------
  // Screens: loading, setup, login, app

  function showScreen(name) {
    $$('section[data-screen]').forEach(function (section) { section.hidden = section.dataset.screen !== name; });
    const inApp = name === 'app';
    $('#logout').hidden = !inApp;
    $('#change-password').hidden = !inApp;
    document.body.dataset.screen = name;
  }

  async function checkSession() {
    showScreen('loading');
    $('#loading-text').textContent = t('loading');
    $('#loading-retry').hidden = true;
    let info;
    try {
      info = await api('GET', 'session');
    } catch (err) {
      $('#loading-text').textContent = err.message;
      $('#loading-retry').hidden = false;
      return;
    }
    state.version = info.version || '';
    $('#app-version').textContent = state.version ? 'v' + state.version : '';
    if (info.logged_in) {
      state.csrf = info.csrf;
      enterApp();
    } else if (info.needs_setup) {
      showSetup(info.setup_allowed !== false);
    } else {
      showLogin();
    }
  }

  function showSetup(allowed) {
    showScreen('setup');
    $('#setup-form').hidden = !allowed;
    $('#setup-remote').hidden = allowed;
    if (allowed) $('#setup-password').focus();
  }

  function showLogin() {
    showScreen('login');
    $('#login-password').value = '';
    $('#login-password').focus();
  }

  const onSetup = submitForm({
    button: '#setup-submit',
    error: '#setup-error',
    read: function () {
      const password = $('#setup-password').value;
      if (password.length < 8) refuse(t('setup.tooShort'));
      return { password: password };
    },
    send: function (body) { return api('POST', 'setup', body); },
    done: function (data) {
      state.csrf = data.csrf;
      $('#setup-password').value = '';
      toast(t('setup.done'), 'ok');
      enterApp();
    },
    failed: function (err) {
      if (err.status === 409) setTimeout(checkSession, 1500); // someone set it meanwhile: sign in
      return err.message;
    },
  });

  const onLogin = submitForm({
    button: '#login-submit',
    error: '#login-error',
    read: function () {
      const password = $('#login-password').value;
      if (!password) refuse(t('login.empty'));
      return { password: password };
    },
    send: function (body) { return api('POST', 'login', body); },
    done: function (data) {
      state.csrf = data.csrf;
      $('#login-password').value = '';
      enterApp();
    },
    failed: function (err) {
      if (err.status === 401) return t('login.wrong');
      if (err.status === 429) waitBeforeLogin(err.retryAfter || 30); // shows its own countdown
      else if (err.status === 409) checkSession(); // no password yet after all
      else return err.message;
      return '';
    },
  });

  /** After too many attempts the server says how long to wait: count it down. */
  function waitBeforeLogin(seconds) {
    const error = $('#login-error');
    const button = $('#login-submit');
    let left = seconds;
    clearInterval(state.loginWaitTimer);
    button.disabled = true;
    error.dataset.retryAfter = String(seconds);
    const tick = function () {
      if (left <= 0) {
        clearInterval(state.loginWaitTimer);
        button.disabled = false;
        error.textContent = '';
        delete error.dataset.retryAfter;
        return;
      }
      error.textContent = t('login.tooMany', { s: left });
      left -= 1;
    };
    tick();
    state.loginWaitTimer = setInterval(tick, 1000);
  }

  function enterApp() {
    state.loggedIn = true;
    showScreen('app');
    const fromHash = location.hash.replace('#', '');
    const saved = storeGet(STORE.tab);
    selectTab(isTab(fromHash) ? fromHash : (isTab(saved) ? saved : 'dashboard'));
    startLogStream();
    startPolling();
  }

  /** Stop everything the signed-in page runs (polling, log stream, sign-in, playground). */
  function leaveApp() {
    state.loggedIn = false;
    state.csrf = null;
    stopPolling();
    stopLogStream();
    stopOAuthPolling();
    if (state.pgAbort) state.pgAbort.abort();
    closeCreatedKey();
    closeOAuthBox();
    closePasswordDialog();
  }

  /** The session ended (logout, expiry, password changed elsewhere): back to the sign-in form. */
  function signedOut(expired) {
    const wasIn = state.loggedIn;
    leaveApp();
    showLogin();
    if (expired && wasIn) toast(t('login.expired'), 'error');
  }

  /** The instance serving this page was stopped from it: say so, and how to get back (a node). */
  function pageGone(message) {
    leaveApp();
    showScreen('loading');
    $('#loading-text').textContent = '';
    $('#loading-text').appendChild(message);
    $('#loading-retry').hidden = false;
  }

  // -- what every tab shows from the status answer: the update notice, the missing-login banner --

  function applyPageStatus(s) {
    showUpdateNotice(s.update);
    $('#credentials-banner').hidden = s.credentials !== false;
  }

  /** The dashboard polls the status itself; other tabs ask when shown and after a login change. */
  function refreshPageStatus() {
    return api('GET', 'status').then(applyPageStatus).catch(reportError);
  }

  async function onLogout() {
    try { await api('POST', 'logout', {}); } catch (err) { /* signed out either way */ }
    signedOut(false);
    toast(t('top.loggedOut'), 'ok');
  }

  // ---------------------------------------------------------------------------------
  // Change password dialog

  function openPasswordDialog() {
    $('#pw-current').value = '';
    $('#pw-new').value = '';
    $('#pw-error').textContent = '';
    $('#password-dialog').hidden = false;
    $('#pw-current').focus();
  }

  function closePasswordDialog() { $('#password-dialog').hidden = true; }

  const onChangePassword = submitForm({
    button: '#pw-submit',
    error: '#pw-error',
    read: function () {
      const next = $('#pw-new').value;
      if (next.length < 8) refuse(t('setup.tooShort'));
      return { current: $('#pw-current').value, new: next };
    },
    send: function (body) { return api('POST', 'password', body); },
    done: function (data) {
      // The server ends all sessions and may hand this browser a fresh one.
      if (data && data.csrf) state.csrf = data.csrf;
      closePasswordDialog();
      toast(t('pw.done'), 'ok');
    },
    failed: function (err) { return err.status === 401 && !err.silent ? t('pw.wrong') : errorText(err); },
  });

  // ---------------------------------------------------------------------------------
  // Confirmation dialog: resolves true (yes) or false (no, Escape)

  function confirmAction(message) {
    return new Promise(function (resolve) {
      const dialog = $('#confirm-dialog');
      const yes = $('#confirm-yes');
      const no = $('#confirm-no');
      $('#confirm-text').textContent = message;
      dialog.hidden = false;
      yes.focus();
      const finish = function (answer) {
        dialog.hidden = true;
        yes.removeEventListener('click', onYes);
        no.removeEventListener('click', onNo);
        document.removeEventListener('keydown', onKey);
        resolve(answer);
      };
      const onYes = function () { finish(true); };
      const onNo = function () { finish(false); };
      const onKey = function (e) { if (e.key === 'Escape') finish(false); };
      yes.addEventListener('click', onYes);
      no.addEventListener('click', onNo);
      document.addEventListener('keydown', onKey);
    });
  }

  // ---------------------------------------------------------------------------------
  // Tabs and polling

  function isTab(name) { return Object.prototype.hasOwnProperty.call(SCREENS, name); }

  function selectTab(name) {
    if (!isTab(name)) name = 'dashboard';
    state.tab = name;
    storeSet(STORE.tab, name);
    $$('[data-tab]').forEach(function (button) {
      const active = button.dataset.tab === name;
      button.classList.toggle('active', active);
      button.setAttribute('aria-selected', active ? 'true' : 'false');
    });
    $$('[data-panel]').forEach(function (panel) { panel.hidden = panel.dataset.panel !== name; });
    if (location.hash !== '#' + name && window.history && history.replaceState) {
      history.replaceState(null, '', '#' + name);
    }
    refreshTab(name, false);
    if (name !== 'dashboard') refreshPageStatus();
  }

  /**
   * Fetch what a tab shows and draw it; rejects when the fetch fails. `soft` (polling,
   * language change, after an action) must not wipe form input: load() answers nothing then
   * where a full load would rebuild a form.
   */
  async function loadScreen(name, soft) {
    const screen = SCREENS[name];
    const data = await screen.load(!!soft);
    if (data !== null && data !== undefined) screen.render(data);
  }

  /** loadScreen for the tab machinery: a failure becomes a toast. */
  function refreshTab(name, soft) { return loadScreen(name, soft).catch(reportError); }

  function startPolling() {
    stopPolling();
    const loop = function () {
      state.pollTimer = setTimeout(async function () {
        if (state.loggedIn && !document.hidden && SCREENS[state.tab].polled) {
          await refreshTab(state.tab, true);
        }
        if (state.loggedIn) loop();
      }, POLL_MS);
    };
    loop();
  }

  function stopPolling() {
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
  }

  // ---------------------------------------------------------------------------------
  // Keyed table rows: update cells in place so buttons survive a refresh every 2 s

  function findRow(tbody, keyAttr, key) {
    for (let i = 0; i < tbody.children.length; i++) {
      if (tbody.children[i].getAttribute(keyAttr) === key) return tbody.children[i];
    }
    return null;
  }

  function syncRows(tbody, items, keyAttr, keyOf, build, update, emptyText) {
    const seen = {};
    items.forEach(function (item, index) {
      const key = String(keyOf(item));
      seen[key] = true;
      let row = findRow(tbody, keyAttr, key);
      if (!row) {
        row = build(item);
        row.setAttribute(keyAttr, key);
      }
      update(row, item);
      if (tbody.children[index] !== row) tbody.insertBefore(row, tbody.children[index] || null);
    });
    $$(':scope > tr', tbody).forEach(function (row) {
      if (!seen[row.getAttribute(keyAttr)]) row.remove();
    });
    if (!items.length) {
      const columns = tbody.parentNode.querySelectorAll('thead th').length || 1;
      tbody.appendChild(el('tr', { class: 'empty' }, el('td', { colspan: columns, text: emptyText || t('table.empty') })));
    }
  }

  /** A row of empty cells named by data-col, plus an actions cell with the given buttons. */
  function buildRow(columns, actions) {
    const row = el('tr');
    columns.forEach(function (col) { row.appendChild(el('td', { 'data-col': col })); });
    if (actions) {
      const cell = el('td', { 'data-col': 'actions', class: 'actions' });
      actions.forEach(function (a) {
        cell.appendChild(el('button', { type: 'button', class: 'small ' + (a.kind || ''), 'data-action': a.action, 'data-i18n': a.label, text: t(a.label) }));
      });
      row.appendChild(cell);
    }
    return row;
  }

  function setCell(row, col, value, className) {
    const cell = row.querySelector('[data-col="' + col + '"]');
    const text = value === null || value === undefined ? '' : String(value);
    if (cell.textContent !== text) cell.textContent = text;
    if (className !== undefined) cell.className = className;
    return cell;
  }

  function setBadge(row, col, text, kind, title) {
    const cell = row.querySelector('[data-col="' + col + '"]');
    cell.textContent = '';
    cell.appendChild(el('span', { class: 'badge ' + (kind || ''), title: title || null, text: text }));
    return cell;
  }

  /**
   * A table wider than its box scrolls sideways; the side with more to see fades out
   * (data-more="left right" on .table-wrap, drawn by app.css), so a phone user sees there is more.
   */
  function watchTableScroll() {
    const update = function (wrap) {
      const more = [];
      if (wrap.scrollLeft > 1) more.push('left');
      if (wrap.scrollLeft + wrap.clientWidth < wrap.scrollWidth - 1) more.push('right');
      wrap.dataset.more = more.join(' ');
    };
    const observer = window.ResizeObserver ? new ResizeObserver(function (entries) {
      entries.forEach(function (entry) { update(entry.target.closest('.table-wrap')); });
    }) : null;
    $$('.table-wrap').forEach(function (wrap) {
      wrap.addEventListener('scroll', function () { update(wrap); }, { passive: true });
      if (observer) {
        observer.observe(wrap);             // the page width changes
        observer.observe(wrap.firstElementChild); // rows come and go
      }
    });
  }

  /** Row actions use event delegation: one listener per table, rows come and go. */
  function onRowAction(tableSelector, keyAttr, handler) {
    $(tableSelector).addEventListener('click', function (event) {
      const button = event.target.closest('[data-action]');
      if (!button || button.disabled) return;
      const row = button.closest('[' + keyAttr + ']');
      if (!row) return;
      button.disabled = true;
      Promise.resolve(handler(button.dataset.action, row.getAttribute(keyAttr), button))
        .catch(reportError)
        .then(function () { button.disabled = false; });
    });
  }

  // ---------------------------------------------------------------------------------
  // Dashboard

  function setStat(name, text, raw) {
    const node = $('[data-stat="' + name + '"]');
    if (!node) return;
    node.textContent = text;
    node.dataset.value = raw === undefined ? text : String(raw);
  }

  function renderStatus(s) {
    const instances = s.instances || [];
    const running = instances.filter(function (i) { return i.running; }).length;
    const loggedIn = s.credentials !== false;
    // running: green; running without credentials (every request fails): amber; stopped: red
    const value = !running ? 'stopped' : loggedIn ? 'running' : 'not-logged-in';
    const statusText = !running ? t('state.stopped') : t(loggedIn ? 'state.running' : 'state.noCredentials') +
      (instances.length > 1 ? ' (' + running + '/' + instances.length + ')' : '');
    setStat('status', statusText, value);
    $('[data-stat="status"]').className = 'stat-value ' + { running: 'ok-text', 'not-logged-in': 'warn-text', stopped: 'bad-text' }[value];
    setStat('uptime', fmtDuration(s.uptime_s), s.uptime_s);
    setStat('version', s.version || state.version || '–', s.version || '');
    ['requests', 'errors', 'input_tokens', 'output_tokens'].forEach(function (k) { setStat(k, fmtInt(s[k]), s[k]); });
    $('[data-stat="errors"]').classList.toggle('bad-text', s.errors > 0);
    const latency = s.latency_ms || {};
    ['avg', 'p50', 'p95'].forEach(function (k) { setStat('latency_' + k, fmtMs(latency[k]), latency[k]); });
    renderCounts('#table-by-model', s.by_model);
    renderCounts('#table-by-provider', s.by_provider);
    renderCounts('#table-by-account', s.by_account);
    applyPageStatus(s);
  }

  function renderCounts(tableSelector, counts) {
    const entries = Object.keys(counts || {}).map(function (k) { return [k, counts[k]]; });
    entries.sort(function (a, b) { return b[1] - a[1] || (a[0] < b[0] ? -1 : 1); });
    syncRows($(tableSelector + ' tbody'), entries, 'data-name', function (e) { return e[0]; },
      function () { return buildRow(['name', 'count']); },
      function (row, e) { setCell(row, 'name', e[0]); setCell(row, 'count', fmtInt(e[1]), 'num'); },
      t('dash.noRequests'));
  }

  // -- usage history: GET /admin/api/usage?since=24h|7d|30d, drawn as inline SVG charts --
  //
  // The answer: {enabled, since (unix s), days, models, providers}; each row {key, requests,
  // errors, input_tokens, output_tokens, reasoning_tokens, p50_ms, p95_ms}. Days (the server's
  // local dates, YYYY-MM-DD) come only when they had requests: the page fills the gaps from
  // `since` to today. The charts are drawn as wide as their box, in pixels (viewBox = the box),
  // so text keeps its size; a change of width draws them again. Colours are CSS classes
  // (app.css), so both themes apply without a redraw.

  /**
   * Whether the dashboard's poll should ask for the usage history too: always when the tab
   * is opened (not soft); else when the status counted requests the history may not hold yet,
   * or the last answer is older than USAGE_MAX_AGE_MS (a new day, another instance).
   */
  function usageDue(status, soft) {
    const u = state.usage;
    const count = typeof status.requests === 'number' ? status.requests : null;
    if (count !== u.count) {
      u.count = count;
      u.countSeenAt = Date.now();
    }
    return !soft || !u.fetchedAt || u.settled !== u.count || Date.now() - u.fetchedAt >= USAGE_MAX_AGE_MS;
  }

  /** Ask for the usage history of the chosen range; keeps the answer (or the error) in state.usage. */
  async function fetchUsage() {
    const u = state.usage;
    const seq = ++u.seq;
    const range = u.range;
    const count = u.count;
    const started = Date.now();
    u.fetchedAt = started;
    try {
      const answer = await api('GET', 'usage?since=' + enc(range));
      if (seq !== u.seq) return;
      u.data = { range: range, answer: answer };
      u.error = '';
    } catch (err) {
      if (seq !== u.seq || err.silent) return;
      u.data = null;
      u.error = errorText(err);
    }
    // A request is counted a moment before its row is written: a count first seen just
    // before this fetch is asked about once more at the next poll.
    if (started - u.countSeenAt >= 1000) u.settled = count;
  }

  function onUsageRange(event) {
    const button = event.target.closest('[data-range]');
    if (!button || USAGE_RANGES.indexOf(button.dataset.range) < 0) return;
    if (button.dataset.range === state.usage.range && state.usage.data) return;
    state.usage.range = button.dataset.range;
    storeSet(STORE.usageRange, state.usage.range);
    renderUsage(); // the pressed button and "loading" at once
    fetchUsage().then(renderUsage);
  }

  function dayKey(date) {
    const pad = function (n) { return (n < 10 ? '0' : '') + n; };
    return date.getFullYear() + '-' + pad(date.getMonth() + 1) + '-' + pad(date.getDate());
  }

  function parseDay(key) {
    const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(String(key));
    return m ? new Date(Number(m[1]), Number(m[2]) - 1, Number(m[3])) : null;
  }

  function emptyDay(key) {
    return { key: key, requests: 0, errors: 0, input_tokens: 0, output_tokens: 0, reasoning_tokens: 0, p50_ms: null, p95_ms: null };
  }

  /** Every day from the day of `since` to today (local dates), the days without requests as zeros. */
  function usageDays(answer) {
    const given = {};
    (answer.days || []).forEach(function (day) { if (day && day.key) given[day.key] = day; });
    const keys = [];
    const now = new Date();
    const today = new Date(now.getFullYear(), now.getMonth(), now.getDate());
    const since = typeof answer.since === 'number' && answer.since > 0 ? new Date(answer.since * 1000) : today;
    let day = new Date(since.getFullYear(), since.getMonth(), since.getDate());
    while (day <= today && keys.length < 400) {
      keys.push(dayKey(day));
      day = new Date(day.getFullYear(), day.getMonth(), day.getDate() + 1); // not +24 h: DST days are not 24 h
    }
    // Days outside that span (the server's clock or time zone differs) still show.
    Object.keys(given).forEach(function (key) { if (keys.indexOf(key) < 0) keys.push(key); });
    keys.sort();
    return keys.map(function (key) { return given[key] || emptyDay(key); });
  }

  /** Numbers in charts: 950, 9.5k, 12k, 1.2M. */
  function fmtCompact(n) {
    if (typeof n !== 'number' || !isFinite(n)) return '–';
    const units = ['', 'k', 'M', 'G'];
    let i = 0;
    while (Math.abs(n) >= 999.95 && i < units.length - 1) { n /= 1000; i += 1; } // 999.96k is 1M
    return (Math.abs(n) >= 100 || i === 0 && Number.isInteger(n) ? Math.round(n) : Math.round(n * 10) / 10) + units[i];
  }

  /** Numbers in tooltips: in full, grouped the page language's way. */
  function fmtFull(n) {
    return typeof n === 'number' && isFinite(n) ? n.toLocaleString(langTag()) : '–';
  }

  function fmtLatency(ms, inSeconds) {
    if (typeof ms !== 'number' || !isFinite(ms)) return '–';
    if (inSeconds || ms >= 1000) return Math.round(ms / 100) / 10 + ' s';
    return (ms >= 10 ? Math.round(ms) : Math.round(ms * 10) / 10) + ' ms';
  }

  function fmtDay(key, long) {
    const date = parseDay(key);
    if (!date) return String(key);
    const options = long ? { weekday: 'short', year: 'numeric', month: 'short', day: 'numeric' } : { month: 'short', day: 'numeric' };
    return date.toLocaleDateString(langTag(), options);
  }

  /** An axis from 0 with 2 to 5 round steps (1, 2, 2.5, 5 × 10^n) up to at least max. */
  function niceScale(max, whole) {
    if (!(max > 0)) max = whole ? 4 : 1;
    const raw = max / 4;
    const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
    const steps = whole ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10];
    let step = magnitude * 10;
    for (let i = 0; i < steps.length; i++) {
      if (raw <= steps[i] * magnitude) { step = steps[i] * magnitude; break; }
    }
    if (whole) step = Math.max(1, Math.round(step));
    const top = Math.ceil(max / step - 1e-9) * step;
    const ticks = [];
    for (let i = 0; i * step <= top + step / 1e6; i++) ticks.push(Math.round(i * step * 1e6) / 1e6);
    return { max: top, ticks: ticks };
  }

  // - SVG drawing -

  const SVG_NS = 'http://www.w3.org/2000/svg';
  const CHART_TEXT_PX = 11;  // axis text (app.css: .chart-svg text)
  const CHART_LABEL_PX = 13; // names in the bar lists (.chart-svg .label)
  const CHART_VALUE_PX = 12; // their numbers (.chart-svg .value)

  /** svg('rect', {x: 1, class: 'bar'}, child...) like el(), in the SVG namespace. */
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (name) {
      const value = attrs[name];
      if (value === null || value === undefined || value === false) return;
      if (name === 'text') node.textContent = value;
      else node.setAttribute(name, typeof value === 'number' ? String(Math.round(value * 100) / 100) : String(value));
    });
    for (let i = 2; i < arguments.length; i++) if (arguments[i]) node.appendChild(arguments[i]);
    return node;
  }

  let measureContext = null;
  /** The width in px of text in the page's font at a size (to size margins and shorten names). */
  function textWidth(text, px) {
    if (!measureContext) measureContext = document.createElement('canvas').getContext('2d');
    if (!measureContext) return String(text).length * px * 0.6;
    measureContext.font = px + 'px ' + getComputedStyle(document.body).fontFamily;
    return measureContext.measureText(String(text)).width;
  }

  function shorten(text, px, width) {
    text = String(text);
    if (textWidth(text, px) <= width) return text;
    let end = text.length;
    while (end > 1 && textWidth(text.slice(0, end) + '…', px) > width) end -= 1;
    return text.slice(0, end) + '…';
  }

  function chartRoot(box, width, height) {
    const caption = box.parentNode.querySelector('figcaption');
    return svg('svg', {
      class: 'chart-svg', viewBox: '0 0 ' + width + ' ' + height, width: '100%', height: height,
      preserveAspectRatio: 'xMinYMin meet', role: 'img', 'aria-label': caption ? caption.textContent : null,
    });
  }

  /**
   * A chart of days: y axis with round ticks and grid lines, a day label under every few
   * columns (always today's), and per day a <g class="day" data-day=...> holding a <title>
   * tooltip, a hover area and what spec.draw adds. spec: {max(days), whole, axis(v, scale),
   * data(day) -> attributes, tip(day) -> lines, draw(g, day, geometry), after(svg, geometry)}.
   */
  function drawDayChart(box, days, spec) {
    const width = Math.floor(box.clientWidth);
    if (width < 60 || !days.length) return;
    const height = width < 420 ? 170 : 190;
    const scale = niceScale(spec.max(days), spec.whole);
    const tickText = scale.ticks.map(function (v) { return spec.axis(v, scale); });
    const left = Math.ceil(Math.max.apply(null, tickText.map(function (s) { return textWidth(s, CHART_TEXT_PX); }))) + 10;
    const labels = days.map(function (d) { return fmtDay(d.key, false); });
    const labelWidths = labels.map(function (s) { return textWidth(s, CHART_TEXT_PX); });
    // room on the right for today's label, centred under its column
    const todayHalf = labelWidths[days.length - 1] / 2;
    const right = Math.max(4, Math.ceil(todayHalf - (width - left - 4) / days.length / 2) + 2);
    const top = 8;
    const bottom = 24;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const y = function (v) { return top + plotH - Math.max(0, Math.min(1, v / scale.max)) * plotH; };
    const band = plotW / days.length;
    const root = chartRoot(box, width, height);

    const grid = svg('g', { class: 'axis', 'aria-hidden': 'true' });
    scale.ticks.forEach(function (v, i) {
      grid.appendChild(svg('line', { class: i ? 'gridline' : 'baseline', x1: left, x2: width - right, y1: y(v), y2: y(v) }));
      grid.appendChild(svg('text', { class: 'tick', x: left - 6, y: y(v), dy: '0.32em', 'text-anchor': 'end', text: tickText[i] }));
    });
    const every = Math.max(1, Math.ceil((Math.max.apply(null, labelWidths) + 10) / band));
    // From today backwards; a label pushed inside at an edge may not cover its neighbour.
    let free = width;
    for (let i = days.length - 1; i >= 0; i -= every) {
      const half = labelWidths[i] / 2;
      const x = Math.min(Math.max(left + (i + 0.5) * band, half + 1), width - half - 1);
      if (x + half > free) continue;
      free = x - half - 8;
      grid.appendChild(svg('text', { class: 'tick day-label', 'data-day': days[i].key, x: x, y: height - 7,
        'text-anchor': 'middle', text: labels[i] }));
    }
    root.appendChild(grid);

    const geometry = { left: left, band: band, y: y };
    days.forEach(function (d, i) {
      const g = svg('g', Object.assign({ class: 'day', 'data-day': d.key }, spec.data(d)));
      g.appendChild(svg('title', { text: [fmtDay(d.key, true)].concat(spec.tip(d)).join('\n') }));
      g.appendChild(svg('rect', { class: 'hit', x: left + i * band, y: top, width: band, height: plotH }));
      spec.draw(g, d, Object.assign({ x0: left + i * band }, geometry));
      root.appendChild(g);
    });
    if (spec.after) spec.after(root, geometry, days);
    box.replaceChildren(root);
  }

  /** Bars of stacked parts [{cls, value}] from the bottom up, centred in the day's column. */
  function stackedBars(g, parts, geo) {
    const barW = Math.max(1, Math.min(32, geo.band * 0.7));
    const x = geo.x0 + (geo.band - barW) / 2;
    let sum = 0;
    parts.forEach(function (part) {
      if (!(part.value > 0)) return;
      const y0 = geo.y(sum);
      sum += part.value;
      const y1 = geo.y(sum);
      g.appendChild(svg('rect', { class: 'bar ' + part.cls, x: x, y: y1, width: barW, height: Math.max(0, y0 - y1) }));
    });
  }

  const DAY_CHARTS = {
    requests: {
      whole: true,
      max: function (days) { return Math.max.apply(null, days.map(function (d) { return d.requests; })); },
      axis: function (v) { return fmtCompact(v); },
      data: function (d) { return { 'data-requests': d.requests, 'data-errors': d.errors }; },
      tip: function (d) {
        return [t('usage.tip.requests', { n: fmtFull(d.requests) }), t('usage.tip.errors', { n: fmtFull(d.errors) })];
      },
      draw: function (g, d, geo) {
        stackedBars(g, [{ cls: 's-requests', value: d.requests - d.errors }, { cls: 's-errors', value: d.errors }], geo);
      },
    },
    tokens: {
      whole: true,
      max: function (days) { return Math.max.apply(null, days.map(function (d) { return d.input_tokens + d.output_tokens; })); },
      axis: function (v) { return fmtCompact(v); },
      data: function (d) { return { 'data-input': d.input_tokens, 'data-output': d.output_tokens }; },
      tip: function (d) {
        const lines = [t('usage.tip.input', { n: fmtFull(d.input_tokens) }), t('usage.tip.output', { n: fmtFull(d.output_tokens) })];
        if (d.reasoning_tokens) lines.push(t('usage.tip.reasoning', { n: fmtFull(d.reasoning_tokens) }));
        return lines;
      },
      draw: function (g, d, geo) {
        stackedBars(g, [{ cls: 's-input', value: d.input_tokens }, { cls: 's-output', value: d.output_tokens }], geo);
      },
    },
    latency: {
      max: function (days) {
        return Math.max.apply(null, days.map(function (d) { return d.requests ? Math.max(d.p50_ms || 0, d.p95_ms || 0) : 0; }));
      },
      axis: function (v, scale) { return v ? fmtLatency(v, scale.max >= 2000) : '0'; },
      data: function (d) { return d.requests ? { 'data-p50': d.p50_ms, 'data-p95': d.p95_ms } : {}; },
      tip: function (d) {
        return d.requests ? [t('usage.tip.latency', { p50: fmtLatency(d.p50_ms), p95: fmtLatency(d.p95_ms) })] : [t('usage.tip.none')];
      },
      draw: function (g, d, geo) {
        if (!d.requests) return;
        const x = geo.x0 + geo.band / 2;
        // a month's dots are small and plain (no ring), so they do not run together
        const r = Math.max(1.75, Math.min(4.5, geo.band * 0.2));
        const ring = r >= 3 ? 1.5 : 0;
        g.appendChild(svg('circle', { class: 'dot s-p95', cx: x, cy: geo.y(d.p95_ms || 0), r: r, 'stroke-width': ring }));
        g.appendChild(svg('circle', { class: 'dot s-p50', cx: x, cy: geo.y(d.p50_ms || 0), r: ring ? r * 2 / 3 : r,
          'stroke-width': ring }));
      },
      // one line per percentile from day to day with requests (a day without any has no
      // latency, not a latency of 0: the line passes over it)
      after: function (root, geo, days) {
        const lines = svg('g', { class: 'lines', 'aria-hidden': 'true' });
        [['p95_ms', 's-p95'], ['p50_ms', 's-p50']].forEach(function (series) {
          const points = [];
          days.forEach(function (d, i) {
            if (!d.requests) return;
            points.push((geo.left + (i + 0.5) * geo.band).toFixed(1) + ' ' + geo.y(d[series[0]] || 0).toFixed(1));
          });
          if (points.length > 1) lines.appendChild(svg('path', { class: 'line ' + series[1], d: 'M' + points.join('L') }));
        });
        root.insertBefore(lines, root.querySelector('g.day')); // under the dots, so they keep their tooltips
      },
    },
  };

  const BAR_LIST_ROWS = 8; // more models than this: the rest as one "Others" row

  /** Horizontal bars of requests (errors the red end), one row per model or provider:
   *  its name on the left, its requests and tokens on the right, the bar below. */
  function drawBarList(box, rows) {
    const width = Math.floor(box.clientWidth);
    if (width < 60) return;
    rows = (rows || []).slice();
    if (rows.length > BAR_LIST_ROWS) {
      const rest = rows.splice(BAR_LIST_ROWS - 1);
      const others = emptyDay(t('usage.others', { n: rest.length }));
      rest.forEach(function (r) {
        ['requests', 'errors', 'input_tokens', 'output_tokens', 'reasoning_tokens'].forEach(function (k) { others[k] += r[k] || 0; });
      });
      others.others = true;
      rows.push(others);
    }
    const rowH = 40;
    const root = chartRoot(box, width, Math.max(1, rows.length) * rowH - 8);
    const max = Math.max.apply(null, rows.map(function (r) { return r.requests; }).concat([1]));
    rows.forEach(function (r, i) {
      const top = i * rowH;
      const name = r.others || r.key !== '-' ? String(r.key) : t('usage.unknown'); // "-": the history names none
      const tokens = (r.input_tokens || 0) + (r.output_tokens || 0);
      const value = t('usage.barValue', { requests: fmtCompact(r.requests), tokens: fmtCompact(tokens) });
      const tip = [name, t('usage.tip.requests', { n: fmtFull(r.requests) }), t('usage.tip.errors', { n: fmtFull(r.errors) }),
        t('usage.tip.input', { n: fmtFull(r.input_tokens) }), t('usage.tip.output', { n: fmtFull(r.output_tokens) })];
      if (!r.others && r.requests) tip.push(t('usage.tip.latency', { p50: fmtLatency(r.p50_ms), p95: fmtLatency(r.p95_ms) }));
      const g = svg('g', { class: 'item' + (r.others ? ' others' : ''), 'data-key': r.others ? null : r.key,
        'data-requests': r.requests, 'data-tokens': tokens }, svg('title', { text: tip.join('\n') }));
      g.appendChild(svg('rect', { class: 'hit', x: 0, y: top, width: width, height: rowH - 8 }));
      const nameWidth = width - textWidth(value, CHART_VALUE_PX) - 12;
      g.appendChild(svg('text', { class: 'label', x: 0, y: top + 14, text: shorten(name, CHART_LABEL_PX, nameWidth) }));
      g.appendChild(svg('text', { class: 'value', x: width, y: top + 14, 'text-anchor': 'end', text: value }));
      g.appendChild(svg('rect', { class: 'track', x: 0, y: top + 21, width: width, height: 10, rx: 3 }));
      // the two parts inside one rounded bar (a clip), so a few errors are a red end, not a red dot
      const full = Math.max(2, width * r.requests / max);
      const errors = r.requests ? full * Math.min(1, (r.errors || 0) / r.requests) : 0;
      const clip = 'usage-clip-' + box.parentNode.dataset.chart + '-' + i;
      g.appendChild(svg('clipPath', { id: clip }, svg('rect', { x: 0, y: top + 21, width: full, height: 10, rx: 3 })));
      [['s-requests', 0, full - errors], ['s-errors', full - errors, errors]].forEach(function (part) {
        if (part[2] > 0) {
          g.appendChild(svg('rect', { class: 'bar ' + part[0], 'clip-path': 'url(#' + clip + ')', x: part[1], y: top + 21,
            width: part[2], height: 10 }));
        }
      });
      root.appendChild(g);
    });
    box.replaceChildren(root);
  }

  /** The usage card from state.usage: the range buttons, a note or the totals and charts. */
  function renderUsage() {
    const u = state.usage;
    const card = $('#usage-card');
    $$('#usage-range [data-range]').forEach(function (button) {
      button.setAttribute('aria-pressed', button.dataset.range === u.range ? 'true' : 'false');
    });
    const answer = u.data && u.data.answer;
    const days = answer && answer.enabled ? usageDays(answer) : [];
    const total = function (k) { return days.reduce(function (sum, d) { return sum + (d[k] || 0); }, 0); };
    let view;
    if (u.error) view = 'error';
    else if (!answer) view = 'loading';
    else if (!answer.enabled) view = 'off';
    else if (!total('requests')) view = 'empty';
    else view = 'ready';
    // a fetch for another range is running: the old charts stay, dimmed, until it answers
    card.dataset.state = u.data && u.data.range !== u.range && !u.error ? 'loading' : view;
    card.dataset.range = u.data ? u.data.range : '';

    const note = { error: t('usage.failed', { message: u.error }), loading: t('loading'), off: t('usage.off'),
      empty: t('usage.empty') }[view];
    $('#usage-note').hidden = !note;
    $('#usage-note').className = 'notice usage-note' + (view === 'error' ? ' warn' : '');
    $('#usage-note-text').textContent = note || '';
    $('#usage-open-config').hidden = view !== 'off';
    $('#usage-range').hidden = view === 'off'; // nothing to choose from
    $('#usage-total').hidden = view !== 'ready';
    $('#usage-total').textContent = '';
    if (view === 'ready') {
      [['usage.tip.requests', fmtFull(total('requests'))], ['usage.tip.errors', fmtFull(total('errors'))],
        ['usage.tip.input', fmtCompact(total('input_tokens'))], ['usage.tip.output', fmtCompact(total('output_tokens'))]]
        .forEach(function (part, i) {
          $('#usage-total').append(i ? ' · ' : '', el('span', { class: 'nowrap', text: t(part[0], { n: part[1] }) }));
        });
    }
    $('#usage-charts').hidden = view !== 'ready';
    // Drawn again only when something shown changes (not on every poll: an open tooltip stays).
    const look = view === 'ready' ? [u.data.range, dayKey(new Date()), window.I18n.getLanguage(), JSON.stringify(answer)].join('|') : '';
    if (look !== u.look) {
      u.look = look;
      u.drawn = view === 'ready' ? { days: days, models: answer.models, providers: answer.providers } : null;
      drawUsageCharts();
    }
  }

  /** Draw the charts of state.usage.drawn at the boxes' current widths (hidden: when shown). */
  function drawUsageCharts() {
    const drawn = state.usage.drawn;
    const charts = $('#usage-charts');
    charts.dataset.width = '';
    if (!drawn || charts.hidden || !charts.offsetWidth) return;
    Object.keys(DAY_CHARTS).forEach(function (name) {
      drawDayChart($('[data-chart="' + name + '"] .chart-box', charts), drawn.days, DAY_CHARTS[name]);
    });
    drawBarList($('[data-chart="models"] .chart-box', charts), drawn.models);
    drawBarList($('[data-chart="providers"] .chart-box', charts), drawn.providers);
    charts.dataset.width = String(charts.offsetWidth);
  }

  /** A new width (window, phone turned, dashboard shown again): draw the charts again. */
  function watchChartWidth() {
    let queued = false;
    const check = function () {
      queued = false;
      const charts = $('#usage-charts');
      if (charts.offsetWidth && charts.dataset.width !== String(charts.offsetWidth)) drawUsageCharts();
    };
    const queue = function () {
      if (!queued) { queued = true; window.requestAnimationFrame(check); }
    };
    if (window.ResizeObserver) new ResizeObserver(queue).observe($('#usage-charts'));
    else window.addEventListener('resize', queue);
  }

  // -- update notice: the status answer's "update" is null or {latest, current, url} --

  function showUpdateNotice(update) {
    state.update = update && update.latest ? update : null;
    renderUpdateNotice();
  }

  /** The banner above the tabs, unless this version's notice was dismissed. */
  function renderUpdateNotice() {
    const update = state.update;
    const box = $('#update-notice');
    box.hidden = !update || storeGet(STORE.updateDismissed) === String(update.latest);
    if (box.hidden) return;
    box.dataset.version = update.latest;
    $('#update-text').textContent = t('update.available', { latest: update.latest, current: update.current || state.version || '?' });
    const link = $('#update-link');
    const url = String(update.url || '');
    link.hidden = !/^https?:\/\//i.test(url); // only web addresses become links
    link.href = link.hidden ? '#' : url;
  }

  function dismissUpdateNotice() {
    if (state.update) storeSet(STORE.updateDismissed, String(state.update.latest));
    $('#update-notice').hidden = true;
  }

  // -- live log: last lines via GET, then new ones via server-sent events --

  async function startLogStream() {
    stopLogStream();
    try {
      const data = await api('GET', 'logs?n=200');
      state.logLines = (data.lines || []).slice(-MAX_LOG_LINES);
      renderLog();
    } catch (err) {
      reportError(err);
    }
    if (state.loggedIn) openLogSource();
  }

  function openLogSource() {
    if (!window.EventSource) return;
    const source = new EventSource('/admin/api/logs/stream');
    state.logSource = source;
    source.addEventListener('open', updateLogState);
    source.addEventListener('log', function (event) {
      try { appendLog(JSON.parse(event.data).line); } catch (e) { appendLog(String(event.data)); }
    });
    source.addEventListener('error', function () {
      updateLogState();
      // EventSource retries by itself unless the server refused (e.g. 401): then we retry,
      // slowly, and only while still signed in.
      if (source.readyState === EventSource.CLOSED && state.logSource === source) {
        state.logSource = null;
        clearTimeout(state.logRetryTimer);
        state.logRetryTimer = setTimeout(function () { if (state.loggedIn) openLogSource(); }, 5000);
      }
    });
    updateLogState();
  }

  function stopLogStream() {
    clearTimeout(state.logRetryTimer);
    if (state.logSource) state.logSource.close();
    state.logSource = null;
    updateLogState();
  }

  function updateLogState() {
    const badge = $('#log-state');
    const source = state.logSource;
    const live = source && source.readyState === 1;
    const connecting = source && source.readyState === 0;
    badge.textContent = live ? t('log.live') : connecting ? t('log.connecting') : t('log.offline');
    badge.className = 'badge ' + (live ? 'ok' : connecting ? 'warn' : 'muted');
    badge.dataset.state = live ? 'live' : connecting ? 'connecting' : 'offline';
  }

  function appendLog(line) {
    state.logLines.push(String(line));
    if (state.logLines.length > MAX_LOG_LINES) state.logLines.splice(0, state.logLines.length - MAX_LOG_LINES);
    // Many lines can arrive at once: draw at most once per frame.
    if (!state.logRenderQueued) {
      state.logRenderQueued = true;
      window.requestAnimationFrame(function () { state.logRenderQueued = false; renderLog(); });
    }
  }

  function renderLog() {
    const box = $('#log-tail');
    box.textContent = state.logLines.join('\n');
    if ($('#log-follow').checked) box.scrollTop = box.scrollHeight;
  }

  // ---------------------------------------------------------------------------------
  // Instances

  function renderInstances(data) {
    state.instances = data.instances || [];
    syncRows($('#instances-table tbody'), data.instances || [], 'data-instance', function (i) { return i.name; },
      function () {
        return buildRow(['name', 'url', 'address', 'state', 'requests', 'errors', 'in_flight'], [
          { action: 'start', label: 'action.start' },
          { action: 'stop', label: 'action.stop' },
          { action: 'remove', label: 'action.remove', kind: 'danger' }]);
      },
      updateInstanceRow, t('inst.none'));
  }

  function updateInstanceRow(row, inst) {
    const name = setCell(row, 'name', inst.name);
    row.dataset.thisPage = inst.this_page ? 'true' : 'false';
    if (inst.this_page) name.append(' ', el('span', { class: 'badge ok', title: t('inst.thisPageTitle'), text: t('inst.thisPage') }));
    const urlCell = row.querySelector('[data-col="url"]');
    const link = urlCell.querySelector('a');
    if (!inst.url) urlCell.textContent = '–';
    else if (!link || link.getAttribute('href') !== inst.url) {
      urlCell.textContent = '';
      urlCell.appendChild(el('a', { href: inst.url, target: '_blank', rel: 'noopener', text: inst.url }));
    }
    setCell(row, 'address', hostPort(inst.host, inst.port));
    setBadge(row, 'state', inst.running ? t('state.running') : t('state.stopped'), inst.running ? 'ok' : 'muted');
    row.dataset.running = inst.running ? 'true' : 'false';
    setCell(row, 'requests', fmtInt(inst.requests), 'num');
    setCell(row, 'errors', fmtInt(inst.errors), 'num');
    setCell(row, 'in_flight', fmtInt(inst.in_flight), 'num');
    row.querySelector('[data-action="start"]').hidden = !!inst.running;
    row.querySelector('[data-action="stop"]').hidden = !inst.running;
  }

  function hostPort(host, port) {
    if (!host) return port === undefined ? '' : ':' + port;
    return (host.indexOf(':') >= 0 ? '[' + host + ']' : host) + ':' + port;
  }

  /**
   * Start, stop or remove an instance. Stopping (or removing) the one serving this page ends
   * the page: that asks first and says how to get back, as removing any instance asks.
   */
  async function instanceAction(action, name, button) {
    const thisPage = action !== 'start' && button.closest('tr').dataset.thisPage === 'true';
    const question = thisPage ? t(action === 'stop' ? 'inst.confirmStopThisPage' : 'inst.confirmRemoveThisPage', { name: name }) +
      ' ' + wayBack(name).textContent : action === 'remove' ? t('inst.confirmRemove', { name: name }) : '';
    if (question && !(await confirmAction(question))) return;
    if (action === 'remove') await api('DELETE', 'instances/' + enc(name));
    else await api('POST', 'instances/' + enc(name) + '/' + action, {});
    if (thisPage) return pageGone(el('span', null, t('inst.pageGone', { name: name }) + ' ', wayBack(name)));
    toast(t({ start: 'inst.started', stop: 'inst.stopped', remove: 'inst.removed' }[action], { name: name }), 'ok');
    await loadScreen('instances', true);
  }

  /** How to reach the admin again once the instance `name` (serving this page) stops: the
   *  admin addresses of the other running instances as links, else to run iflow2api again. */
  function wayBack(name) {
    const others = state.instances.filter(function (i) { return i.running && i.url && i.name !== name; });
    if (!others.length) return el('span', null, t('inst.backRun'));
    const parts = t('inst.backOther', { urls: '\u0000' }).split('\u0000');
    const links = el('span');
    others.forEach(function (i, n) { links.append(n ? ', ' : '', el('a', { href: i.url + '/admin', text: i.url + '/admin' })); });
    return el('span', null, parts[0], links, parts[1] || '');
  }

  const onAddInstance = submitForm({
    button: '#instance-add',
    read: function () {
      const name = $('#instance-name').value.trim();
      const host = $('#instance-host').value.trim();
      const portText = $('#instance-port').value.trim();
      const port = Number(portText);
      if (!name) refuse(t('inst.needName'));
      if (!portText || !Number.isInteger(port) || port < 1 || port > 65535) refuse(t('inst.badPort'));
      return { name: name, host: host || '127.0.0.1', port: port };
    },
    send: function (body) { return api('POST', 'instances', body); },
    done: function (inst, body) {
      toast(t('inst.added', { name: inst.name || body.name, url: inst.url || '' }), 'ok');
      $('#instance-name').value = '';
      $('#instance-port').value = '';
      return loadScreen('instances', true);
    },
  });

  // ---------------------------------------------------------------------------------
  // Accounts and sign-in

  function renderAccounts(data) {
    syncRows($('#accounts-table tbody'), data.accounts || [], 'data-account', function (a) { return a.id; },
      function () {
        return buildRow(['id', 'label', 'auth_type', 'api_key', 'expires_at', 'status', 'in_flight', 'requests', 'errors'],
          [{ action: 'remove', label: 'action.remove', kind: 'danger' }]);
      },
      updateAccountRow, t('acc.none'));
  }

  function statusKind(status) {
    const s = String(status || '').toLowerCase();
    if (/^(ok|active|ready|healthy|valid)/.test(s)) return 'ok';
    if (/(error|expired|invalid|fail|disabled)/.test(s)) return 'bad';
    return 'warn';
  }

  function updateAccountRow(row, a) {
    setCell(row, 'id', a.id);
    setCell(row, 'label', a.label || '–');
    setCell(row, 'auth_type', a.auth_type || '–');
    setCell(row, 'api_key', a.api_key || '–', 'code token');
    setCell(row, 'expires_at', fmtExpiry(a.expires_at));
    const cell = setBadge(row, 'status', a.status || '–', statusKind(a.status), a.message || null);
    if (a.message) cell.appendChild(el('div', { class: 'small muted', text: a.message }));
    setCell(row, 'in_flight', fmtInt(a.in_flight), 'num');
    setCell(row, 'requests', fmtInt(a.requests), 'num');
    setCell(row, 'errors', fmtInt(a.errors), 'num');
  }

  async function accountAction(action, id) {
    if (action !== 'remove') return;
    if (!(await confirmAction(t('acc.confirmRemove', { id: id })))) return;
    await api('DELETE', 'accounts/' + enc(id));
    toast(t('acc.removed', { id: id }), 'ok');
    refreshPageStatus();
    await loadScreen('accounts', true);
  }

  /**
   * The server tries a key on its provider before saving it. A refused key (422 key_refused) is
   * not saved: the user may save it anyway (force). An unreachable provider saves it unchecked.
   */
  const onAddAccountKey = submitForm({
    button: '#account-add',
    read: function () {
      const key = $('#account-key').value.trim();
      if (!key) refuse(t('acc.needKey'));
      return { api_key: key, add: $('#account-add-extra').checked, force: false };
    },
    send: async function (body) {
      try {
        return await api('POST', 'accounts', body);
      } catch (err) {
        if (err.code !== 'key_refused') throw err;
        if (!(await confirmAction(t('acc.refused', { message: err.message })))) return null;
        return api('POST', 'accounts', Object.assign({}, body, { force: true }));
      }
    },
    done: function (data) {
      if (!data) return toast(t('acc.notSaved'), 'info');
      $('#account-key').value = '';
      if (data.check === 'unreachable') toast(t('acc.addedUnchecked', { id: data.id }), 'warn');
      else toast(t(data.check === 'ok' ? 'acc.addedChecked' : 'acc.added', { id: data.id }), 'ok');
      refreshPageStatus();
      return loadScreen('accounts', true);
    },
  });

  async function onOAuthStart() {
    // Open the tab now, inside the click, or popup blockers stop it; point it at the
    // sign-in page once the server has made the URL.
    const tab = window.open('about:blank', '_blank');
    stopOAuthPolling();
    let data;
    try {
      data = await api('POST', 'accounts/oauth/start', { add: $('#account-add-extra').checked });
    } catch (err) {
      if (tab) tab.close();
      return reportError(err);
    }
    if (tab) {
      try { tab.opener = null; tab.location.href = data.url; } catch (e) { /* the link below still works */ }
    }
    $('#oauth-url').href = data.url;
    $('#oauth-url').textContent = data.url;
    $('#oauth-pasted').value = '';
    $('#oauth-box').hidden = false;
    showOAuthState({ state: 'waiting' });
    state.oauth = { session: data.session, timer: null };
    pollOAuth();
  }

  function pollOAuth() {
    const run = state.oauth;
    if (!run) return;
    run.timer = setTimeout(async function () {
      if (state.oauth !== run) return;
      try {
        const info = await api('GET', 'accounts/oauth/' + enc(run.session));
        if (state.oauth !== run) return;
        if (showOAuthState(info)) pollOAuth();
      } catch (err) {
        reportError(err);
        if (err.status !== 404 && err.status !== 401) pollOAuth();
        else stopOAuthPolling();
      }
    }, OAUTH_POLL_MS);
  }

  /** Show a sign-in state; true while it is still worth polling. */
  function showOAuthState(info) {
    const node = $('#oauth-state');
    const name = info.state || 'waiting';
    node.dataset.state = name;
    node.textContent = t('oauth.' + name) + (info.message ? ': ' + info.message : '');
    node.className = name === 'done' ? 'ok-text' : name === 'error' ? 'bad-text' : '';
    if (name === 'done') {
      toast(t('acc.added', { id: info.account || '' }), 'ok');
      stopOAuthPolling();
      refreshTab('accounts', true);
      refreshPageStatus();
      return false;
    }
    if (name === 'error') {
      stopOAuthPolling();
      return false;
    }
    return true;
  }

  const onOAuthPaste = submitForm({
    button: '#oauth-submit',
    read: function () {
      const session = state.oauth ? state.oauth.session : $('#oauth-box').dataset.session;
      if (!session) refuse(); // no sign-in to finish
      const pasted = $('#oauth-pasted').value.trim();
      if (!pasted) refuse(t('acc.needPaste'));
      return { session: session, pasted: pasted };
    },
    send: function (input) { return api('POST', 'accounts/oauth/' + enc(input.session), { pasted: input.pasted }); },
    done: function (info) { showOAuthState(info); },
  });

  function stopOAuthPolling() {
    if (state.oauth) {
      clearTimeout(state.oauth.timer);
      // keep the session id so a pasted address can still finish an errored attempt
      $('#oauth-box').dataset.session = state.oauth.session;
    }
    state.oauth = null;
  }

  function closeOAuthBox() {
    stopOAuthPolling();
    delete $('#oauth-box').dataset.session;
    $('#oauth-box').hidden = true;
  }

  // ---------------------------------------------------------------------------------
  // Providers and model routes

  function renderProviders(data) {
    const providers = data.providers || [];
    providers.forEach(function (p) { if (p.name !== 'iflow' && p.configured === false) state.presets.set(p.name, p); });
    fillPresetSelect();
    syncRows($('#providers-table tbody'), providers, 'data-provider', function (p) { return p.name; },
      function () {
        return buildRow(['name', 'state', 'base_url', 'keys', 'notes'], [
          { action: 'add', label: 'prov.addPreset', kind: 'primary' },
          { action: 'default', label: 'prov.setDefault' },
          { action: 'remove', label: 'action.remove', kind: 'danger' }]);
      },
      updateProviderRow, t('table.empty'));
    showPresetNotes();
  }

  function updateProviderRow(row, p) {
    const preset = p.configured === false;
    setCell(row, 'name', p.name);
    const cell = row.querySelector('[data-col="state"]');
    cell.textContent = '';
    if (p.default) cell.appendChild(el('span', { class: 'badge ok', text: t('prov.default') }));
    cell.appendChild(el('span', { class: 'badge ' + (p.enabled ? 'ok' : 'muted'), text: t(p.enabled ? 'prov.enabled' : (preset ? 'prov.isPreset' : 'prov.disabled')) }));
    setCell(row, 'base_url', p.base_url || '–', 'code small');
    // One unbreakable token per masked key: a key never wraps in its middle.
    const keys = setCell(row, 'keys', (p.keys || []).length || p.keyless ? '' : '–', 'code small');
    (p.keys || []).forEach(function (key) { keys.appendChild(el('span', { class: 'token', text: key })); });
    if (p.keyless) keys.appendChild(el('span', { class: 'token', text: t('prov.noKeyNeeded') }));
    setCell(row, 'notes', providerNote(p), 'small muted');
    row.querySelector('[data-action="add"]').hidden = !preset;
    row.querySelector('[data-action="default"]').hidden = !!p.default || !p.enabled;
    // Only providers in the config can be removed (presets and iflow are built in).
    row.querySelector('[data-action="remove"]').hidden = p.name === 'iflow' || preset;
  }

  /**
   * A provider's note in the page's language. Chinese notes are keyed by preset name (a
   * provider made from a preset has that preset's note); otherwise the server's English note.
   */
  function providerNote(p) {
    const key = 'prov.note.' + (p.preset || p.name);
    return window.I18n.has(key, window.I18n.getLanguage()) ? t(key) : (p.notes || '');
  }

  function fillPresetSelect() {
    const select = $('#provider-preset');
    const chosen = select.value;
    Array.prototype.slice.call(select.options, 1).forEach(function (o) { o.remove(); });
    Array.from(state.presets.keys()).sort().forEach(function (name) { select.appendChild(el('option', { value: name, text: name })); });
    select.value = state.presets.has(chosen) ? chosen : '';
  }

  /**
   * Fill the add form from a preset: its name and base URL (replacing what was typed only
   * when `force`, the row's Add button; the select keeps typed values) and its notes.
   */
  function choosePreset(name, force) {
    const preset = state.presets.get(name);
    $('#provider-preset').value = preset ? name : '';
    if (preset) {
      [['#provider-name', name], ['#provider-base-url', preset.base_url || '']].forEach(function (pair) {
        const input = $(pair[0]);
        if (force || !input.value.trim() || input.value === input.dataset.filled) {
          input.value = pair[1];
          input.dataset.filled = pair[1];
        }
      });
    }
    showPresetNotes();
  }

  function showPresetNotes() {
    const preset = state.presets.get($('#provider-preset').value);
    const box = $('#provider-notes');
    box.hidden = !preset || !preset.notes;
    box.textContent = preset ? providerNote(preset) : '';
  }

  async function providerAction(action, name) {
    if (action === 'add') {
      choosePreset(name, true);
      $('#provider-form').scrollIntoView({ block: 'nearest' });
      $('#provider-key').focus();
      return;
    }
    if (action === 'default') {
      await api('PUT', 'config', { changes: { default_provider: name } });
      toast(t('prov.nowDefault', { name: name }), 'ok');
    } else if (action === 'remove') {
      if (!(await confirmAction(t('prov.confirmRemove', { name: name })))) return;
      await api('DELETE', 'providers/' + enc(name));
      toast(t('prov.removed', { name: name }), 'ok');
      refreshPageStatus();
    }
    await loadScreen('providers', true);
  }

  const onAddProvider = submitForm({
    button: '#provider-add',
    read: function () {
      const preset = $('#provider-preset').value;
      const name = $('#provider-name').value.trim() || preset;
      if (!name) refuse(t('prov.needName'));
      const body = { name: name, default: $('#provider-default').checked };
      if (preset) body.preset = preset;
      const key = $('#provider-key').value.trim();
      if (key) body.api_key = key;
      // The preset's own base URL is not written to the config (it follows the preset).
      const baseUrl = $('#provider-base-url').value.trim();
      const presetUrl = preset && state.presets.has(preset) ? state.presets.get(preset).base_url : '';
      if (baseUrl && baseUrl !== presetUrl) body.base_url = baseUrl;
      const models = $('#provider-models').value.split(/[,\s]+/).filter(Boolean);
      if (models.length) body.models = models;
      return body;
    },
    send: function (body) { return api('POST', 'providers', body); },
    done: function (answer, body) {
      toast(t('prov.saved', { name: body.name }), 'ok');
      $('#provider-key').value = '';
      refreshPageStatus();
      return loadScreen('providers', true);
    },
  });

  /** model_map / model_routes editors on the providers tab (they are plain config keys). */
  function renderRoutes(data) {
    state.config = data;
    const cfg = data.config || {};
    $('#routes-model-map').value = JSON.stringify(cfg.model_map || {}, null, 2);
    $('#routes-model-routes').value = JSON.stringify(cfg.model_routes || {}, null, 2);
    const editable = data.editable || [];
    $('#routes-card').hidden = editable.indexOf('model_map') < 0 && editable.indexOf('model_routes') < 0;
  }

  const onSaveRoutes = submitForm({
    button: '#routes-save',
    read: function () {
      const changes = {};
      [['model_map', '#routes-model-map'], ['model_routes', '#routes-model-routes']].forEach(function (field) {
        const input = $(field[1]);
        let value = null;
        try { value = JSON.parse(input.value || '{}'); } catch (e) { /* refused below */ }
        if (!value || typeof value !== 'object' || Array.isArray(value)) {
          input.setAttribute('aria-invalid', 'true');
          refuse(t('cfg.badJson', { key: field[0] }));
        }
        input.removeAttribute('aria-invalid');
        changes[field[0]] = value;
      });
      return { changes: changes };
    },
    send: function (body) { return api('PUT', 'config', body); },
    done: async function () {
      toast(t('cfg.saved'), 'ok');
      renderRoutes(await api('GET', 'config'));
    },
  });

  // ---------------------------------------------------------------------------------
  // Client API keys

  function renderKeys(data) {
    const keys = data.keys || [];
    state.keysExist = keys.length > 0;
    syncRows($('#keys-table tbody'), keys, 'data-key', function (k) { return k.id; },
      function () { return buildRow(['id', 'masked'], [{ action: 'revoke', label: 'keys.revoke', kind: 'danger' }]); },
      function (row, k) { setCell(row, 'id', k.id); setCell(row, 'masked', k.masked, 'code token'); },
      t('keys.none'));
  }

  const onCreateKey = submitForm({
    button: '#key-create',
    // With no key, clients on this machine need none; after the first, every client does.
    confirm: async function () {
      const data = await api('GET', 'keys');
      return (data.keys || []).length ? '' : t('keys.confirmFirst');
    },
    send: function () { return api('POST', 'keys', {}); },
    done: function (data) {
      $('#key-created-value').value = data.key;
      $('#key-created').hidden = false;
      $('#key-created-value').select();
      return loadScreen('keys', true);
    },
  });

  async function keyAction(action, id) {
    if (action !== 'revoke') return;
    if (!(await confirmAction(t('keys.confirmRevoke', { id: id })))) return;
    await api('DELETE', 'keys/' + enc(id));
    toast(t('keys.revoked', { id: id }), 'ok');
    await loadScreen('keys', true);
  }

  function closeCreatedKey() {
    $('#key-created-value').value = ''; // the full key leaves the page for good
    $('#key-created').hidden = true;
  }

  /** Clipboard API needs a secure context (http://127.0.0.1 is one, a LAN address is not). */
  async function copyText(text) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        return toast(t('copy.done'), 'ok');
      }
    } catch (e) { /* fall back below */ }
    const area = el('textarea', { class: 'offscreen', readonly: true });
    area.value = text;
    document.body.appendChild(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    area.remove();
    toast(t(ok ? 'copy.done' : 'copy.failed'), ok ? 'ok' : 'error');
  }

  // ---------------------------------------------------------------------------------
  // Config form: the editable keys in the groups of the server's schema, one control per type:
  // select (choices), number (int, float), switch (bool), text (str), comma-separated text
  // (list) and a JSON editor (object) only for maps.

  /** A key's schema entry; a key the schema lacks is typed by its value, under Advanced. */
  function keySchema(key) {
    const data = state.config || {};
    const given = (data.schema || {})[key];
    if (given) return given;
    const value = (data.config || {})[key];
    const type = typeof value === 'boolean' ? 'bool' : typeof value === 'number' ? 'float'
      : Array.isArray(value) ? 'list' : value && typeof value === 'object' ? 'object' : 'str';
    return { group: 'advanced', type: type };
  }

  function renderConfig(data) {
    state.config = data;
    const form = $('#config-form');
    form.textContent = '';
    const groups = {};
    const group = function (name) {
      if (!groups[name]) {
        // Advanced (the OAuth internals and low-level limits) starts folded.
        groups[name] = el('details', { class: 'config-group', 'data-group': name, open: name !== 'advanced' },
          el('summary', { 'data-i18n': 'cfg.group.' + name, text: t('cfg.group.' + name) }),
          el('div', { class: 'config-fields' }));
      }
      return groups[name];
    };
    (data.groups || []).forEach(group);
    (data.editable || []).forEach(function (key) {
      group(keySchema(key).group || 'advanced').lastChild.appendChild(configField(key, (data.config || {})[key], keySchema(key)));
    });
    Object.keys(groups).forEach(function (name) { if (groups[name].lastChild.children.length) form.appendChild(groups[name]); });
    $('#config-confirm').hidden = true;
    filterConfig();
  }

  function configControl(id, value, schema) {
    const type = schema.type;
    let input;
    if (type === 'bool') {
      input = el('input', { type: 'checkbox', role: 'switch', class: 'switch', id: id });
      input.checked = value === true;
    } else if (schema.choices) {
      input = el('select', { id: id });
      const choices = schema.choices.map(String);
      if (choices.indexOf(String(value)) < 0) choices.push(String(value)); // never change a value unasked
      choices.forEach(function (c) { input.appendChild(el('option', { value: c, text: c })); });
      input.value = String(value);
    } else if (type === 'int' || type === 'float') {
      input = el('input', { type: 'number', id: id, step: type === 'int' ? '1' : 'any', min: schema.min, max: schema.max });
      input.value = value === undefined || value === null ? '' : String(value);
    } else if (type === 'object') {
      const text = JSON.stringify(value === undefined ? {} : value, null, 2);
      input = el('textarea', { id: id, class: 'code', spellcheck: 'false', rows: Math.min(12, text.split('\n').length + 1) });
      input.value = text;
    } else {
      input = el('input', { type: 'text', id: id, autocomplete: 'off', spellcheck: 'false' });
      if (type === 'list') {
        input.dataset.i18nPlaceholder = 'cfg.listPlaceholder';
        input.placeholder = t('cfg.listPlaceholder');
        input.value = (value || []).join(', ');
      } else {
        input.value = value === undefined || value === null ? '' : String(value);
      }
    }
    return input;
  }

  function configField(key, value, schema) {
    const id = 'cfg-' + key;
    const input = configControl(id, value, schema);
    input.dataset.configKey = key;
    input.dataset.type = schema.type;
    input.setAttribute('aria-describedby', id + '-hint ' + id + '-error');
    const head = el('div', { class: 'config-head' });
    if (schema.type === 'bool') head.appendChild(input);
    head.appendChild(el('label', { for: id, class: 'config-key code', text: key }));
    if (schema.restart) {
      head.appendChild(el('span', { class: 'badge warn', 'data-restart': '', 'data-i18n': 'cfg.restart', 'data-i18n-title': 'cfg.restartTitle',
        title: t('cfg.restartTitle'), text: t('cfg.restart') }));
    }
    const wide = schema.type === 'object' ? ' is-json' : '';
    const field = el('div', { class: 'config-field' + wide, 'data-field': key }, head);
    if (schema.type !== 'bool') field.appendChild(input);
    field.appendChild(el('div', { id: id + '-error', class: 'field-error small', role: 'alert' }));
    field.appendChild(el('div', { id: id + '-hint', class: 'small muted', 'data-i18n': 'cfg.hint.' + key, text: t('cfg.hint.' + key) }));
    return field;
  }

  /** A field's value for the server; throws (its message for the field) when it is not usable. */
  function readConfigInput(input) {
    const type = input.dataset.type;
    const text = input.value.trim();
    if (type === 'bool') return input.checked;
    if (type === 'int' || type === 'float') {
      const n = Number(text);
      if (text === '' || !isFinite(n)) throw new Error(t('cfg.badNumber'));
      if (type === 'int' && !Number.isInteger(n)) throw new Error(t('cfg.badInt'));
      return n;
    }
    if (type === 'list') return text.split(',').map(function (part) { return part.trim(); }).filter(Boolean);
    if (type === 'object') {
      let value = null;
      try { value = JSON.parse(text || '{}'); } catch (e) { /* refused below */ }
      if (!value || typeof value !== 'object' || Array.isArray(value)) throw new Error(t('cfg.badObject'));
      return value;
    }
    return input.value;
  }

  /** Show a message under a key's field (none: clear them all); false when no such field. */
  function markConfigField(key, message) {
    if (!key) {
      $$('[data-config-key]', $('#config-form')).forEach(function (input) { input.removeAttribute('aria-invalid'); });
      $$('.field-error', $('#config-form')).forEach(function (line) { line.textContent = ''; });
      return true;
    }
    const field = $('[data-field="' + key + '"]', $('#config-form'));
    if (!field) return false;
    const input = field.querySelector('[data-config-key]');
    input.setAttribute('aria-invalid', 'true');
    field.querySelector('.field-error').textContent = message;
    const group = field.closest('details');
    field.hidden = group.hidden = false;
    group.open = true;
    input.focus();
    return true;
  }

  /**
   * {key: value} of the fields that differ from the config as loaded (masked secrets are
   * never written back). `mark`: a field that cannot be read is marked and stops the save.
   */
  function collectConfigChanges(mark) {
    const original = (state.config && state.config.config) || {};
    const changes = {};
    $$('[data-config-key]', $('#config-form')).forEach(function (input) {
      const key = input.dataset.configKey;
      let value;
      try {
        value = readConfigInput(input);
      } catch (err) {
        if (mark) {
          markConfigField(key, err.message);
          refuse(); // the message is under the field
        }
        changes[key] = null;
        return;
      }
      const before = original[key];
      if (before === undefined && value === '') return;
      if (JSON.stringify(value) !== JSON.stringify(before)) changes[key] = value;
    });
    return changes;
  }

  /** Changing a key marked "password" needs the admin password again: ask as soon as one changes. */
  function askPasswordIfNeeded() {
    const guarded = Object.keys(collectConfigChanges(false)).some(function (key) { return keySchema(key).password; });
    if (guarded) $('#config-confirm').hidden = false;
  }

  const onSaveConfig = submitForm({
    button: '#config-save',
    read: function () {
      markConfigField('');
      const changes = collectConfigChanges(true);
      if (!Object.keys(changes).length) refuse(t('cfg.nothing'), 'info');
      const body = { changes: changes };
      const password = $('#config-password').value;
      if (!$('#config-confirm').hidden && password) body.password = password;
      return body;
    },
    send: function (body) { return api('PUT', 'config', body); },
    done: function (data, body) {
      $('#config-password').value = '';
      renderConfig(Object.assign({}, state.config, { config: data.config }));
      const keys = Object.keys(body.changes);
      const restart = keys.filter(function (key) { return keySchema(key).restart; });
      toast(t('cfg.savedKeys', { keys: keys.join(', ') }) +
        (restart.length ? ' ' + t('cfg.savedRestart', { keys: restart.join(', ') }) : ''), 'ok');
    },
    // Nothing is saved when the server refuses a change; the field it names shows why.
    failed: function (err) {
      if (err.code === 'password_required') {
        $('#config-confirm').hidden = false;  // keys that redirect credentials: ask for the password, then Save again
        $('#config-password').focus();
      }
      if (err.param && !err.silent && markConfigField(err.param, err.message)) return '';
      return errorText(err);
    },
  });

  /** Show the fields whose key or description contains the filter text; open their groups. */
  function filterConfig() {
    const needle = $('#config-filter').value.trim().toLowerCase();
    $$('.config-group', $('#config-form')).forEach(function (group) {
      let shown = 0;
      $$('[data-field]', group).forEach(function (field) {
        const text = (field.dataset.field + ' ' + t('cfg.hint.' + field.dataset.field)).toLowerCase();
        field.hidden = needle !== '' && text.indexOf(needle) < 0;
        if (!field.hidden) shown += 1;
      });
      group.hidden = shown === 0;
      if (needle && shown) group.open = true;
    });
  }

  // ---------------------------------------------------------------------------------
  // Playground: stream a chat completion or a Responses answer through /admin/api/playground

  /** Fill the model list; `keys` (null when unknown) tells whether curl needs a key. */
  function renderPlayground(data) {
    if (data.keys) state.keysExist = (data.keys.keys || []).length > 0;
    const select = $('#pg-model');
    const models = data.models.models || [];
    // the model picked on this page, else the configured default model, else the first
    const wanted = select.value || data.models.default;
    select.textContent = '';
    models.forEach(function (id) { select.appendChild(el('option', { value: id, text: id })); });
    if (!models.length) select.appendChild(el('option', { value: '', text: t('pg.noModels') }));
    if (wanted && models.indexOf(wanted) >= 0) select.value = wanted;
    updateCurl();
  }

  /**
   * The two APIs the playground speaks. Each knows its public path, the request body for the
   * form's text and how to read one streamed event into {text, thought, outputTokens, done}
   * (it throws when the event reports a failure).
   */
  const PG_APIS = {
    chat: {
      path: '/v1/chat/completions',
      body: function (model, system, prompt) {
        const messages = [];
        if (system) messages.push({ role: 'system', content: system });
        messages.push({ role: 'user', content: prompt });
        return { model: model, messages: messages, stream: true };
      },
      read: function (payload) {
        if (payload === '[DONE]') return { done: true };
        const chunk = parseEvent(payload);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const delta = firstChoiceDelta(chunk);
        return {
          text: delta.content,
          thought: delta.reasoning_content || delta.reasoning,
          outputTokens: chunk.usage && chunk.usage.completion_tokens,
        };
      },
    },
    responses: {
      path: '/v1/responses',
      body: function (model, system, prompt) {
        const body = { model: model };
        if (system) body.instructions = system;
        body.input = prompt;
        body.stream = true;
        return body;
      },
      read: function (payload) {
        const event = parseEvent(payload);
        switch (event.type) {
          case 'response.output_text.delta': return { text: event.delta };
          case 'response.reasoning_summary_text.delta':
          case 'response.reasoning_text.delta': return { thought: event.delta };
          case 'response.completed':
          case 'response.incomplete': {
            const usage = event.response && event.response.usage;
            return { done: true, outputTokens: usage && usage.output_tokens };
          }
          case 'response.failed':
          case 'error': {
            const error = (event.response && event.response.error) || event.error || event;
            throw new Error(error.message || JSON.stringify(error));
          }
          default: return {};
        }
      },
    },
  };

  function parseEvent(payload) {
    try { return JSON.parse(payload) || {}; } catch (e) { return {}; }
  }

  function playgroundApiName() { return $('#pg-api').value === 'responses' ? 'responses' : 'chat'; }

  /** What Send asks for: the API, its public path and the body without the admin-only "api". */
  function playgroundRequest(model) {
    const name = playgroundApiName();
    const system = $('#pg-system').value.trim();
    return { name: name, api: PG_APIS[name], body: PG_APIS[name].body(model, system, $('#pg-prompt').value) };
  }

  function shellSingleQuote(text) { return "'" + text.replace(/'/g, "'\\''") + "'"; }

  /** The public-endpoint request equal to what Send does (curl -N: print as it streams). */
  function updateCurl() {
    const box = $('#pg-curl');
    if (!box) return;
    const request = playgroundRequest($('#pg-model').value || 'MODEL');
    const lines = ['curl -N ' + location.origin + request.api.path, "-H 'content-type: application/json'"];
    // Double quotes so the shell expands the variable.
    if (state.keysExist) lines.push('-H "authorization: Bearer $IFLOW2API_KEY"');
    lines.push('-d ' + shellSingleQuote(JSON.stringify(request.body)));
    box.textContent = lines.join(' \\\n  ');
  }

  /** Read an SSE body and call onData(dataString) per event; stops when onData returns true. */
  async function readSse(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder('utf-8');
    let buffer = '';
    let data = [];
    const dispatch = function () {
      if (!data.length) return false;
      const payload = data.join('\n');
      data = [];
      return onData(payload) === true;
    };
    for (;;) {
      const chunk = await reader.read();
      buffer += chunk.done ? decoder.decode() : decoder.decode(chunk.value, { stream: true });
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = chunk.done ? '' : lines.pop(); // keep a partial line for the next read
      for (let i = 0; i < lines.length; i++) {
        const line = lines[i];
        if (line === '') { if (dispatch()) { reader.cancel().catch(function () {}); return; } }
        else if (line.indexOf('data:') === 0) data.push(line.slice(line.charAt(5) === ' ' ? 6 : 5));
        // comments (":") and other fields (event:, id:) are not needed here
      }
      if (chunk.done) { dispatch(); return; }
    }
  }

  function firstChoiceDelta(chunk) {
    const choice = chunk && chunk.choices && chunk.choices[0];
    return (choice && (choice.delta || choice.message)) || {};
  }

  async function onSendPrompt(event) {
    if (event) event.preventDefault();
    if (state.pgAbort) return;
    const model = $('#pg-model').value;
    const prompt = $('#pg-prompt').value;
    if (!model) return toast(t('pg.needModel'), 'error');
    if (!prompt.trim()) return toast(t('pg.needPrompt'), 'error');
    const request = playgroundRequest(model);

    const output = $('#pg-output');
    const reasoning = $('#pg-reasoning');
    output.textContent = '';
    reasoning.textContent = '';
    $('#pg-reasoning-box').hidden = true;
    output.dataset.state = 'streaming';
    output.classList.remove('bad-text');
    showPlaygroundMeta(function () { return t('pg.waiting'); });
    const controller = new AbortController();
    state.pgAbort = controller;
    $('#pg-send').disabled = true;
    $('#pg-stop').disabled = false;

    const started = performance.now();
    let firstAt = 0;
    let outputTokens;
    const onChunk = function (payload) {
      const part = request.api.read(payload);
      if (part.thought) { reasoning.textContent += part.thought; $('#pg-reasoning-box').hidden = false; }
      if (part.text) {
        if (!firstAt) firstAt = performance.now();
        output.textContent += part.text;
      }
      if (typeof part.outputTokens === 'number') outputTokens = part.outputTokens;
      return part.done === true;
    };

    try {
      const res = await fetch('/admin/api/playground',
        requestOptions('POST', Object.assign({ api: request.name }, request.body), controller.signal));
      if (!res.ok) throw failure(res, await readJson(res)); // an upstream's 401 is only shown
      if (res.body && res.body.getReader) {
        await readSse(res.body, onChunk);
      } else {
        // No streaming body support: parse the whole answer at the end.
        (await res.text()).split(/\r?\n/).forEach(function (line) {
          if (line.indexOf('data:') === 0) onChunk(line.slice(5).trim());
        });
      }
      output.dataset.state = 'done';
      const totalMs = performance.now() - started;
      const firstMs = firstAt && firstAt - started;
      showPlaygroundMeta(function () { return playgroundMeta(totalMs, firstMs, outputTokens); });
    } catch (err) {
      if (err && err.name === 'AbortError') {
        output.dataset.state = 'stopped';
        showPlaygroundMeta(function () { return t('pg.stopped'); });
      } else {
        output.dataset.state = 'error';
        output.classList.add('bad-text');
        if (!output.textContent) output.textContent = (err && err.message) || String(err);
        showPlaygroundMeta(function () { return t('pg.failed'); });
        reportError(err);
      }
    } finally {
      controller.abort(); // after an error mid-stream, stop reading the rest
      state.pgAbort = null;
      $('#pg-send').disabled = false;
      $('#pg-stop').disabled = true;
    }
  }

  /** The status line under Send, from a function of the language so it can be said again. */
  function showPlaygroundMeta(text) {
    state.pgMeta = text;
    $('#pg-meta').textContent = text();
  }

  function playgroundMeta(totalMs, firstMs, outputTokens) {
    const parts = [t('pg.total', { ms: Math.round(totalMs) })];
    if (firstMs) parts.push(t('pg.first', { ms: Math.round(firstMs) }));
    if (outputTokens !== undefined) parts.push(t('pg.tokens', { n: outputTokens }));
    return parts.join(' · ');
  }

  // ---------------------------------------------------------------------------------
  // The tabs: one entry per tab, in no other list. index.html has its button and panel.
  //   polled    refreshed every POLL_MS while shown
  //   load(soft)    fetch what it shows; answers null when there is nothing to draw
  //                 (soft: polling, a language change or after an action; must not wipe input)
  //   render(data)  draw what load fetched
  //   bind()        wire the tab's forms and buttons, once at start

  const SCREENS = {
    dashboard: {
      polled: true,
      // the usage history with the status when due (usageDue): at most once per poll
      load: async function (soft) {
        const status = await api('GET', 'status');
        if (usageDue(status, soft)) await fetchUsage();
        return status;
      },
      render: function (status) {
        renderStatus(status);
        renderUsage();
      },
      bind: function () {
        on('#log-clear', 'click', function () { state.logLines = []; renderLog(); });
        const range = storeGet(STORE.usageRange);
        if (USAGE_RANGES.indexOf(range) >= 0) state.usage.range = range;
        on('#usage-range', 'click', onUsageRange);
        on('#usage-open-config', 'click', function () {
          $('#config-filter').value = 'usage_history'; // the config page shows that key
          selectTab('config');
        });
        watchChartWidth();
      },
    },
    instances: {
      polled: true,
      load: function () { return api('GET', 'instances'); },
      render: renderInstances,
      bind: function () {
        on('#instance-form', 'submit', onAddInstance);
        onRowAction('#instances-table', 'data-instance', instanceAction);
      },
    },
    accounts: {
      polled: true,
      load: function () { return api('GET', 'accounts'); },
      render: renderAccounts,
      bind: function () {
        on('#account-key-form', 'submit', onAddAccountKey);
        onRowAction('#accounts-table', 'data-account', accountAction);
        on('#oauth-start', 'click', onOAuthStart);
        on('#oauth-paste-form', 'submit', onOAuthPaste);
        on('#oauth-cancel', 'click', closeOAuthBox);
      },
    },
    providers: {
      // soft: the list only, so unsaved route edits stay
      load: function (soft) {
        return Promise.all([api('GET', 'providers'), soft ? null : api('GET', 'config')])
          .then(function (both) { return { providers: both[0], config: both[1] }; });
      },
      render: function (data) {
        renderProviders(data.providers);
        if (data.config) renderRoutes(data.config);
      },
      bind: function () {
        on('#provider-form', 'submit', onAddProvider);
        on('#provider-preset', 'change', function (e) { choosePreset(e.target.value, false); });
        onRowAction('#providers-table', 'data-provider', providerAction);
        on('#routes-save', 'click', onSaveRoutes);
      },
    },
    keys: {
      load: function () { return api('GET', 'keys'); },
      render: renderKeys,
      bind: function () {
        on('#key-create', 'click', onCreateKey);
        on('#key-copy', 'click', function () { copyText($('#key-created-value').value); });
        on('#key-created-close', 'click', closeCreatedKey);
        onRowAction('#keys-table', 'data-key', keyAction);
      },
    },
    config: {
      load: function (soft) { return soft ? null : api('GET', 'config'); }, // a full load rebuilds the form
      render: renderConfig,
      bind: function () {
        on('#config-save', 'click', onSaveConfig);
        on('#config-form', 'submit', onSaveConfig);
        on('#config-reload', 'click', function () {
          loadScreen('config').then(function () { toast(t('cfg.reloaded'), 'info'); }).catch(reportError);
        });
        on('#config-filter', 'input', filterConfig);
        on('#config-form', 'input', askPasswordIfNeeded);
        on('#config-form', 'change', askPasswordIfNeeded);
      },
    },
    playground: {
      load: async function (soft) {
        if (soft) return null;
        updateCurl();
        const keys = api('GET', 'keys').catch(function () { return null; }); // only for the curl hint
        return { models: await api('GET', 'models'), keys: await keys };
      },
      render: renderPlayground,
      bind: function () {
        on('#pg-form', 'submit', onSendPrompt);
        on('#pg-stop', 'click', function () { if (state.pgAbort) state.pgAbort.abort(); });
        on('#pg-models-reload', 'click', function () { refreshTab('playground'); });
        $('#pg-api').value = storeGet(STORE.pgApi) === 'responses' ? 'responses' : 'chat';
        on('#pg-api', 'change', function (e) { storeSet(STORE.pgApi, e.target.value); });
        ['#pg-api', '#pg-model', '#pg-prompt', '#pg-system'].forEach(function (sel) {
          on(sel, 'input', updateCurl);
          on(sel, 'change', updateCurl);
        });
        on('#pg-prompt', 'keydown', function (e) {
          if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) onSendPrompt(e);
        });
        on('#pg-curl-copy', 'click', function () { copyText($('#pg-curl').textContent); });
      },
    },
  };

  // ---------------------------------------------------------------------------------
  // Wiring: the page around the tabs; each tab wires its own in SCREENS

  function on(selector, type, handler) { $(selector).addEventListener(type, handler); }

  function bindEvents() {
    on('#lang-select', 'change', function (e) {
      storeSet(STORE.lang, e.target.value);
      applyLanguage(e.target.value);
    });
    on('#theme-select', 'change', function (e) {
      storeSet(STORE.theme, e.target.value);
      applyTheme();
    });
    if (darkQuery) {
      const onSystemChange = function () { if (themePreference() === 'system') applyTheme(); };
      if (darkQuery.addEventListener) darkQuery.addEventListener('change', onSystemChange);
      else if (darkQuery.addListener) darkQuery.addListener(onSystemChange); // older Safari
    }

    on('#loading-retry', 'click', checkSession);
    on('#setup-form', 'submit', onSetup);
    on('#setup-show', 'change', function (e) { $('#setup-password').type = e.target.checked ? 'text' : 'password'; });
    on('#login-form', 'submit', onLogin);
    on('#logout', 'click', onLogout);
    on('#change-password', 'click', openPasswordDialog);
    on('#password-form', 'submit', onChangePassword);
    on('#pw-cancel', 'click', closePasswordDialog);
    on('#password-dialog', 'keydown', function (e) { if (e.key === 'Escape') closePasswordDialog(); });
    on('#update-dismiss', 'click', dismissUpdateNotice);
    on('#credentials-banner', 'click', function (e) {
      const button = e.target.closest('[data-goto]');
      if (button) selectTab(button.dataset.goto);
    });

    on('#tabs', 'click', function (e) {
      const button = e.target.closest('[data-tab]');
      if (button) selectTab(button.dataset.tab);
    });
    window.addEventListener('hashchange', function () {
      const name = location.hash.replace('#', '');
      if (state.loggedIn && isTab(name) && name !== state.tab) selectTab(name);
    });
    document.addEventListener('visibilitychange', function () {
      if (!document.hidden && state.loggedIn && SCREENS[state.tab].polled) refreshTab(state.tab, true);
    });

    Object.keys(SCREENS).forEach(function (name) { SCREENS[name].bind(); });
  }

  function start() {
    applyTheme();
    applyLanguage(initialLanguage());
    bindEvents();
    watchTableScroll();
    checkSession();
  }

  // Scripts are deferred, so the document is parsed by now.
  start();
})();
