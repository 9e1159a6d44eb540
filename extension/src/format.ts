/** Number formatting and the SQNR colour scale shared by the report views. */

/** The bands of workbench/analysis/sqnr_bands.py: poor (red) below, fair (amber) between,
 *  good (green) from SQNR_GOOD_DB up. */
export const SQNR_POOR_DB = 20;
export const SQNR_GOOD_DB = 30;

export type SqnrBand = 'poor' | 'fair' | 'good';

export function sqnrBand(sqnrDb: number): SqnrBand {
  return sqnrDb < SQNR_POOR_DB ? 'poor' : sqnrDb < SQNR_GOOD_DB ? 'fair' : 'good';
}

/** SQNR at or below this is drawn fully "bad" (red). */
export const SQNR_BAD_DB = 10;
/** SQNR at or above this is drawn fully "good" (green). */
export const SQNR_FULLY_GOOD_DB = 40;

export const MISSING = '\u2014';

export function isNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

export function formatBytes(bytes: number | null | undefined): string {
  if (!isNumber(bytes)) {
    return MISSING;
  }
  if (bytes < 1024) {
    return `${bytes} B`;
  }
  if (bytes < 1024 * 1024) {
    return `${(bytes / 1024).toFixed(1)} KiB`;
  }
  return `${(bytes / (1024 * 1024)).toFixed(2)} MiB`;
}

export function formatDb(value: number | null | undefined): string {
  return isNumber(value) ? `${value.toFixed(1)} dB` : MISSING;
}

export function formatNumber(value: number | null | undefined, digits = 4): string {
  if (!isNumber(value)) {
    return MISSING;
  }
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) {
    return value.toExponential(digits - 1);
  }
  return Number(value.toPrecision(digits)).toString();
}

export function formatCell(value: unknown): string {
  if (value === null || value === undefined) {
    return MISSING;
  }
  if (typeof value === 'number') {
    return Number.isInteger(value) ? value.toString() : formatNumber(value);
  }
  return String(value);
}

/** Position of an SQNR on the bad (0) .. good (1) scale. */
export function sqnrQuality(sqnrDb: number): number {
  const t = (sqnrDb - SQNR_BAD_DB) / (SQNR_FULLY_GOOD_DB - SQNR_BAD_DB);
  return Math.min(1, Math.max(0, t));
}

/** Background colour for an SQNR: red (bad) through amber to green (good). */
export function sqnrColour(sqnrDb: number): string {
  const hue = Math.round(120 * sqnrQuality(sqnrDb));
  return `hsla(${hue}, 75%, 50%, 0.35)`;
}
