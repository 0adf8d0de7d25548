import { defineConfig } from 'vite';

// The page is served by `aether ui` from `/`: index.html at `/`, hashed files under `/assets/`.
export default defineConfig({
  base: '/',
  build: {
    outDir: 'dist',
    assetsDir: 'assets',
    emptyOutDir: true,
    // Only current browsers talk to `aether ui`; no modulepreload polyfill.
    modulePreload: { polyfill: false },
  },
});
