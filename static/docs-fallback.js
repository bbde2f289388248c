/* API docs loader for /docs (Swagger UI) and /redoc (ReDoc), with an offline fallback.
 *
 * The page's <script data-ui="swagger|redoc"> says which viewer to load from the CDN.
 * When its script fails (offline machine, blocked CDN) or its global has not appeared
 * after TIMEOUT_MS, this file fetches /openapi.json itself and renders every path and
 * method with summary, parameters, request body schema and responses into #fallback,
 * and hides the empty viewer container. Everything from the spec is inserted as text
 * (textContent), never as HTML.
 *
 * These pages share the admin's origin, so the viewers are pinned: exact versions, each
 * file with its Subresource Integrity hash (a changed file is refused by the browser),
 * and the server's Content-Security-Policy for /docs and /redoc allows only these
 * files. To update: `npm pack swagger-ui-dist@X redoc@Y`, then
 * `openssl dgst -sha384 -binary FILE | base64` for each file, and change DOCS_CDN_FILES
 * in iflow2api.py to the same URLs.
 */
(function () {
  'use strict';

  const SPEC_URL = '/openapi.json';
  const TIMEOUT_MS = 3000;
  const METHODS = ['get', 'post', 'put', 'patch', 'delete', 'head', 'options', 'trace'];
  const MAX_DEPTH = 8; // nested schemas deeper than this are only named
  const VIEWERS = {
    swagger: {
      name: 'Swagger UI',
      css: 'https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui.css',
      cssIntegrity: 'sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I',
      js: 'https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui-bundle.js',
      jsIntegrity: 'sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9',
      global: 'SwaggerUIBundle',
      container: 'swagger-ui',
      start: function (container) {
        const bundle = window.SwaggerUIBundle;
        bundle({
          url: SPEC_URL,
          domNode: container,
          deepLinking: true,
          presets: [bundle.presets.apis],
          layout: 'BaseLayout',
        });
      },
    },
    redoc: {
      name: 'ReDoc',
      js: 'https://cdn.jsdelivr.net/npm/redoc@2.5.4/bundles/redoc.standalone.js',
      jsIntegrity: 'sha384-w447zOpYfw/1Tv/5AK9NfHTlQIqE3RVR6KY62jCyy9zNDgO64cMwGGP1Fj0zJVf5',
      global: 'Redoc',
      container: 'redoc-container',
      start: function (container) {
        window.Redoc.init(SPEC_URL, { hideDownloadButton: false }, container, function (err) {
          if (err) showFallback('ReDoc could not render the document (' + err + ').');
        });
      },
    },
  };

  const viewer = VIEWERS[(document.currentScript && document.currentScript.dataset.ui) || 'swagger'] || VIEWERS.swagger;
  let mode = 'loading'; // loading -> viewer | fallback

  function byId(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setStatus(text) {
    const status = byId('docs-status');
    status.textContent = text || '';
    status.hidden = !text;
  }

  // ---------------------------------------------------------------------------------
  // Loading the CDN viewer

  function loadViewer() {
    if (viewer.css) {
      const link = document.createElement('link');
      link.rel = 'stylesheet';
      link.integrity = viewer.cssIntegrity;
      link.crossOrigin = 'anonymous';
      link.href = viewer.css;
      document.head.appendChild(link);
    }
    const script = document.createElement('script');
    script.integrity = viewer.jsIntegrity;
    script.crossOrigin = 'anonymous';
    script.src = viewer.js;
    script.async = true;
    script.onload = function () {
      if (window[viewer.global]) startViewer();
      else showFallback(viewer.name + ' loaded but did not start.');
    };
    script.onerror = function () { showFallback(viewer.name + ' could not be loaded from the CDN (offline?).'); };
    document.head.appendChild(script);
    setTimeout(function () {
      if (mode === 'loading' && !window[viewer.global]) showFallback(viewer.name + ' did not load within ' + TIMEOUT_MS / 1000 + ' s.');
    }, TIMEOUT_MS);
  }

  /** Start the real viewer; also when it arrives late, after the fallback was shown. */
  function startViewer() {
    if (mode === 'viewer') return;
    const container = byId(viewer.container);
    try {
      viewer.start(container);
    } catch (err) {
      showFallback(viewer.name + ' failed to start (' + err + ').');
      return;
    }
    mode = 'viewer';
    container.hidden = false;
    byId('fallback').hidden = true;
    setStatus('');
  }

  function showFallback(reason) {
    if (mode !== 'loading') return;
    mode = 'fallback';
    byId(viewer.container).hidden = true;
    setStatus(reason + ' Showing a plain list of the endpoints from ' + SPEC_URL + ' instead.');
    const root = byId('fallback');
    root.hidden = false;
    root.dataset.state = 'loading';
    fetch(SPEC_URL, { cache: 'no-store' })
      .then(function (res) {
        if (!res.ok) throw new Error(SPEC_URL + ' answered ' + res.status);
        return res.json();
      })
      .then(function (spec) {
        renderSpec(root, spec);
        root.dataset.state = 'ready';
      })
      .catch(function (err) {
        root.textContent = '';
        root.appendChild(el('p', 'error', 'Could not load ' + SPEC_URL + ': ' + err.message));
        root.dataset.state = 'error';
      });
  }

  // ---------------------------------------------------------------------------------
  // Rendering the OpenAPI document

  /** The object a local "#/a/b/c" reference points to, or null. */
  function resolveRef(spec, ref) {
    if (typeof ref !== 'string' || ref.indexOf('#/') !== 0) return null;
    return ref.slice(2).split('/').reduce(function (node, part) {
      const key = part.replace(/~1/g, '/').replace(/~0/g, '~');
      return node && typeof node === 'object' ? node[key] : undefined;
    }, spec) || null;
  }

  function refName(ref) { return String(ref).split('/').pop(); }

  /** Parameters, bodies and responses may themselves be $refs. */
  function deref(spec, obj) {
    let guard = 0;
    while (obj && obj.$ref && guard++ < 10) obj = resolveRef(spec, obj.$ref) || {};
    return obj || {};
  }

  function anchorFor(method, path) { return 'op-' + method + '-' + path.replace(/[^A-Za-z0-9]+/g, '-').replace(/^-|-$/g, ''); }

  function renderSpec(root, spec) {
    root.textContent = '';
    const info = spec.info || {};
    const head = el('section', 'spec-head');
    head.appendChild(el('h1', '', (info.title || 'API') + (info.version ? ' ' + info.version : '')));
    if (spec.openapi) head.appendChild(el('p', 'muted', 'OpenAPI ' + spec.openapi));
    if (info.description) head.appendChild(el('p', 'description', info.description));
    (spec.servers || []).forEach(function (server) {
      head.appendChild(el('p', 'muted', 'Server: ' + server.url + (server.description ? ' (' + server.description + ')' : '')));
    });
    renderSecuritySchemes(head, spec);
    root.appendChild(head);

    const operations = collectOperations(spec);
    root.appendChild(renderToc(operations));
    operations.forEach(function (op) { root.appendChild(renderOperation(spec, op)); });
    if (!operations.length) root.appendChild(el('p', 'muted', 'The document lists no paths.'));
  }

  function collectOperations(spec) {
    const list = [];
    Object.keys(spec.paths || {}).forEach(function (path) {
      const item = deref(spec, spec.paths[path]);
      METHODS.forEach(function (method) {
        if (item[method]) list.push({ path: path, method: method, op: item[method], shared: item.parameters || [] });
      });
    });
    return list;
  }

  function renderSecuritySchemes(parent, spec) {
    const schemes = (spec.components && spec.components.securitySchemes) || {};
    const names = Object.keys(schemes);
    if (!names.length) return;
    parent.appendChild(el('h2', '', 'Authentication'));
    const list = el('ul');
    names.forEach(function (name) {
      const s = deref(spec, schemes[name]);
      const how = s.type === 'http' ? 'HTTP ' + (s.scheme || '') + (s.bearerFormat ? ' (' + s.bearerFormat + ')' : '')
        : s.type === 'apiKey' ? 'API key in ' + s.in + ' "' + s.name + '"' : (s.type || '');
      const item = el('li');
      item.appendChild(el('code', '', name));
      item.appendChild(document.createTextNode(': ' + how + (s.description ? ' — ' + s.description : '')));
      list.appendChild(item);
    });
    parent.appendChild(list);
  }

  function renderToc(operations) {
    const nav = el('nav', 'toc');
    nav.appendChild(el('h2', '', 'Endpoints (' + operations.length + ')'));
    const list = el('ul');
    operations.forEach(function (o) {
      const item = el('li');
      const link = el('a');
      link.href = '#' + anchorFor(o.method, o.path);
      link.appendChild(el('span', 'method method-' + o.method, o.method.toUpperCase()));
      link.appendChild(el('code', '', o.path));
      item.appendChild(link);
      if (o.op.summary) item.appendChild(el('span', 'muted', ' — ' + o.op.summary));
      list.appendChild(item);
    });
    nav.appendChild(list);
    return nav;
  }

  function renderOperation(spec, o) {
    const op = o.op;
    const section = el('section', 'operation');
    section.id = anchorFor(o.method, o.path);
    section.dataset.method = o.method;
    section.dataset.path = o.path;

    const title = el('h2', 'op-title');
    title.appendChild(el('span', 'method method-' + o.method, o.method.toUpperCase()));
    title.appendChild(el('code', 'path', o.path));
    if (op.deprecated) title.appendChild(el('span', 'tag deprecated', 'deprecated'));
    section.appendChild(title);

    if (op.summary) section.appendChild(el('p', 'summary', op.summary));
    if (op.description && op.description !== op.summary) section.appendChild(el('p', 'description', op.description));
    const facts = [];
    if (op.operationId) facts.push('operationId: ' + op.operationId);
    if (op.tags && op.tags.length) facts.push('tags: ' + op.tags.join(', '));
    if (op.security) facts.push('auth: ' + (op.security.length ? op.security.map(function (s) { return Object.keys(s).join(' + ') || 'none'; }).join(' or ') : 'none'));
    if (facts.length) section.appendChild(el('p', 'muted small', facts.join(' · ')));

    const params = mergeParameters(spec, o.shared, op.parameters || []);
    if (params.length) section.appendChild(renderParameters(spec, params));
    if (op.requestBody) section.appendChild(renderRequestBody(spec, deref(spec, op.requestBody)));
    section.appendChild(renderResponses(spec, op.responses || {}));
    return section;
  }

  /** Path-level parameters apply unless the operation redefines the same name+location. */
  function mergeParameters(spec, shared, own) {
    const out = [];
    const seen = {};
    own.concat(shared).forEach(function (p) {
      const param = deref(spec, p);
      const key = param.in + ':' + param.name;
      if (!seen[key]) { seen[key] = true; out.push(param); }
    });
    return out;
  }

  function renderParameters(spec, params) {
    const box = el('div', 'block');
    box.appendChild(el('h3', '', 'Parameters'));
    const table = el('table');
    const head = el('tr');
    ['Name', 'In', 'Type', 'Description'].forEach(function (h) { head.appendChild(el('th', '', h)); });
    table.appendChild(el('thead')).appendChild(head);
    const body = el('tbody');
    params.forEach(function (p) {
      const row = el('tr');
      const name = el('td');
      name.appendChild(el('code', '', p.name));
      if (p.required) name.appendChild(el('span', 'required', ' required'));
      row.appendChild(name);
      row.appendChild(el('td', '', p.in));
      row.appendChild(el('td', '', p.schema ? typeLabel(spec, p.schema) : ''));
      row.appendChild(el('td', '', p.description || ''));
      body.appendChild(row);
    });
    table.appendChild(body);
    const wrap = el('div', 'table-wrap');
    wrap.appendChild(table);
    box.appendChild(wrap);
    return box;
  }

  function renderRequestBody(spec, body) {
    const box = el('div', 'block');
    box.appendChild(el('h3', '', 'Request body' + (body.required ? ' (required)' : '')));
    if (body.description) box.appendChild(el('p', 'description', body.description));
    renderContent(spec, box, body.content);
    return box;
  }

  function renderResponses(spec, responses) {
    const box = el('div', 'block');
    box.appendChild(el('h3', '', 'Responses'));
    const codes = Object.keys(responses);
    if (!codes.length) box.appendChild(el('p', 'muted', 'None documented.'));
    codes.forEach(function (code) {
      const response = deref(spec, responses[code]);
      const item = el('div', 'response');
      const head = el('p', 'response-head');
      head.appendChild(el('span', 'status status-' + String(code).charAt(0), code));
      head.appendChild(document.createTextNode(' ' + (response.description || '')));
      item.appendChild(head);
      renderContent(spec, item, response.content);
      box.appendChild(item);
    });
    return box;
  }

  /** Each media type with its schema tree and, when given, an example. */
  function renderContent(spec, parent, content) {
    Object.keys(content || {}).forEach(function (mediaType) {
      const media = content[mediaType] || {};
      const box = el('div', 'media');
      box.appendChild(el('div', 'media-type', mediaType));
      if (media.schema) box.appendChild(renderSchema(spec, media.schema, 0, []));
      const example = media.example !== undefined ? media.example
        : media.examples ? firstExample(spec, media.examples) : undefined;
      if (example !== undefined) {
        const details = el('details');
        details.appendChild(el('summary', '', 'Example'));
        details.appendChild(el('pre', '', typeof example === 'string' ? example : JSON.stringify(example, null, 2)));
        box.appendChild(details);
      }
      parent.appendChild(box);
    });
  }

  function firstExample(spec, examples) {
    const names = Object.keys(examples);
    return names.length ? deref(spec, examples[names[0]]).value : undefined;
  }

  /** A short type name: "string (uri)", "array of Message", "Message", "one of: A | B". */
  function typeLabel(spec, schema) {
    if (!schema) return 'any';
    if (schema.$ref) return refName(schema.$ref);
    const variants = schema.oneOf || schema.anyOf;
    if (variants) return (schema.oneOf ? 'one of: ' : 'any of: ') + variants.map(function (s) { return typeLabel(spec, s); }).join(' | ');
    if (schema.allOf) return schema.allOf.map(function (s) { return typeLabel(spec, s); }).join(' & ');
    let label = schema.type || (schema.properties ? 'object' : 'any');
    if (label === 'array') label = 'array of ' + typeLabel(spec, schema.items);
    else if (label === 'object' && schema.additionalProperties && typeof schema.additionalProperties === 'object' && !schema.properties) {
      label = 'map of ' + typeLabel(spec, schema.additionalProperties);
    }
    if (schema.format) label += ' (' + schema.format + ')';
    if (schema.nullable) label += ', nullable';
    return label;
  }

  /** Extra facts about a schema: enum, default, limits, example. */
  function schemaFacts(schema) {
    const facts = [];
    if (schema.enum) facts.push('one of ' + schema.enum.map(function (v) { return JSON.stringify(v); }).join(', '));
    if (schema.default !== undefined) facts.push('default ' + JSON.stringify(schema.default));
    if (schema.minimum !== undefined) facts.push('min ' + schema.minimum);
    if (schema.maximum !== undefined) facts.push('max ' + schema.maximum);
    if (schema.minLength !== undefined) facts.push('min length ' + schema.minLength);
    if (schema.maxLength !== undefined) facts.push('max length ' + schema.maxLength);
    if (schema.pattern) facts.push('pattern ' + schema.pattern);
    if (schema.example !== undefined) facts.push('e.g. ' + JSON.stringify(schema.example));
    if (schema.readOnly) facts.push('read-only');
    if (schema.deprecated) facts.push('deprecated');
    return facts;
  }

  /**
   * A schema as a nested list. `trail` holds the $refs being expanded above this one,
   * so a recursive schema (a tree, a message holding messages) stops instead of looping.
   */
  function renderSchema(spec, schema, depth, trail) {
    const box = el('div', 'schema');
    if (!schema) return box;
    if (schema.$ref) {
      const name = refName(schema.$ref);
      const target = resolveRef(spec, schema.$ref);
      box.appendChild(el('div', 'schema-name', name));
      if (!target) box.appendChild(el('span', 'muted', ' (unresolved ' + schema.$ref + ')'));
      else if (trail.indexOf(schema.$ref) >= 0) box.appendChild(el('span', 'muted', ' (recursive, see above)'));
      else if (depth >= MAX_DEPTH) box.appendChild(el('span', 'muted', ' (nested too deep to show)'));
      else box.appendChild(renderSchemaBody(spec, target, depth, trail.concat([schema.$ref])));
      return box;
    }
    box.appendChild(renderSchemaBody(spec, schema, depth, trail));
    return box;
  }

  function renderSchemaBody(spec, schema, depth, trail) {
    const box = el('div', 'schema-body');
    if (schema.description && depth === 0) box.appendChild(el('p', 'description', schema.description));
    const variants = schema.oneOf || schema.anyOf || schema.allOf;
    if (variants) {
      box.appendChild(el('div', 'muted small', schema.oneOf ? 'One of:' : schema.anyOf ? 'Any of:' : 'All of:'));
      const list = el('ul', 'variants');
      variants.forEach(function (variant) {
        const item = el('li');
        item.appendChild(renderSchema(spec, variant, depth + 1, trail));
        list.appendChild(item);
      });
      box.appendChild(list);
    }
    if (schema.properties) {
      box.appendChild(renderProperties(spec, schema, depth, trail));
    } else if (schema.type === 'array' && schema.items) {
      box.appendChild(el('div', 'muted small', 'array of:'));
      box.appendChild(renderSchema(spec, schema.items, depth + 1, trail));
    } else if (schema.additionalProperties && typeof schema.additionalProperties === 'object') {
      box.appendChild(el('div', 'muted small', 'object whose values are:'));
      box.appendChild(renderSchema(spec, schema.additionalProperties, depth + 1, trail));
    } else if (!variants) {
      const facts = schemaFacts(schema);
      box.appendChild(el('div', 'type', typeLabel(spec, schema) + (facts.length ? ' — ' + facts.join('; ') : '')));
    }
    return box;
  }

  function renderProperties(spec, schema, depth, trail) {
    const required = schema.required || [];
    const list = el('ul', 'props');
    Object.keys(schema.properties).forEach(function (name) {
      const prop = schema.properties[name] || {};
      const target = prop.$ref ? resolveRef(spec, prop.$ref) || {} : prop;
      const item = el('li');
      const line = el('div', 'prop-line');
      line.appendChild(el('code', 'prop-name', name));
      if (required.indexOf(name) >= 0) line.appendChild(el('span', 'required', 'required'));
      line.appendChild(el('span', 'type', typeLabel(spec, prop)));
      const facts = schemaFacts(target);
      if (facts.length) line.appendChild(el('span', 'muted small', facts.join('; ')));
      item.appendChild(line);
      const description = prop.description || target.description;
      if (description) item.appendChild(el('div', 'description', description));
      if (hasStructure(spec, prop) && depth + 1 < MAX_DEPTH) {
        item.appendChild(renderSchema(spec, childSchema(prop), depth + 1, trail));
      }
      list.appendChild(item);
    });
    if (schema.additionalProperties && typeof schema.additionalProperties === 'object') {
      const item = el('li');
      item.appendChild(el('div', 'muted small', 'other keys: ' + typeLabel(spec, schema.additionalProperties)));
      list.appendChild(item);
    }
    return list;
  }

  /** Nested detail is worth showing for objects, lists of objects and alternatives. */
  function hasStructure(spec, schema) {
    const target = schema.$ref ? resolveRef(spec, schema.$ref) || {} : schema;
    if (target.properties || target.oneOf || target.anyOf || target.allOf) return true;
    if (target.type === 'array' && target.items) return hasStructure(spec, target.items);
    return !!(target.additionalProperties && typeof target.additionalProperties === 'object' && hasStructure(spec, target.additionalProperties));
  }

  /** The schema to expand under a property line: its items for an array (the line already says "array of"). */
  function childSchema(prop) {
    return prop.type === 'array' && prop.items ? prop.items : prop;
  }

  loadViewer();
})();
