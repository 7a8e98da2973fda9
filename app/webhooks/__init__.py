"""Webhook callbacks (Standard Webhooks): signing, target checks, the store, the dispatcher that
turns job transitions into events, delivery with retries, and the sweep for lost deliveries."""
