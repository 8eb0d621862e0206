// /docs: Swagger UI from this package's own copy (ui/vendor), on the API's schema.
// A file of its own, not an inline script: the page's policy allows scripts from here only.
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null, // the public validator is another origin: not asked
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
