/** The rendermime extension: shows `application/vnd.workbench.report+json` outputs. */

import { IRenderMime } from '@jupyterlab/rendermime-interfaces';

import { REPORT_MIME_TYPE } from './report';
import { ReportWidget } from './widget';

export const rendererFactory: IRenderMime.IRendererFactory = {
  // Safe: every string is set as text, so the view may render in untrusted notebooks.
  safe: true,
  mimeTypes: [REPORT_MIME_TYPE],
  createRenderer: options => new ReportWidget(options)
};

const extension: IRenderMime.IExtension = {
  id: 'quantization-workbench:report-renderer',
  description: 'Interactive view of Quantization Workbench reports.',
  rendererFactory,
  // Ahead of text/html (the static fallback in the same bundle).
  rank: 0,
  dataType: 'json'
};

export default extension;
